"""Shared by the three tiers (tests/unit, tests/integration, tests/e2e).

tests/ goes on sys.path, so that the helper module `tiny` (tiny random models, their tokenizer and the sweep
loaders) imports from every tier, and by name from the Dask workers and CLI subprocesses the tests start.
Test modules themselves are imported with --import-mode=importlib (pyproject.toml): the same file name may
stand in two tiers, and no test module is imported by another.

Each embedded model is loaded once per session in float32: `smollm2`, `gemma3`, `qwen`, each (model, tokenizer)
from lllm.load. Their float64 copies (`smollm2_f64`, `gemma3_f64`, `qwen_f64`: 7 GB together) are loaded once per
module and released after it, so that they do not stay in memory while the other tiers run. Tests share these
objects, so a test must leave the model as it found it (lllm.detached restores it on exit). Every test under
tests/integration is marked `slow` here.
"""

import gc
import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))


def pytest_collection_modifyitems(items):
    """The integration tier is the `slow` one: it reads the embedded models' real weights."""
    for item in items:
        if TESTS / "integration" in item.path.parents:
            item.add_marker(pytest.mark.slow)


def _embedded(name: str, dtype: str):
    """(model, tokenizer) of an embedded model from lllm.load; released with the fixture's scope."""
    import lllm

    model, tokenizer = lllm.load(name, dtype=dtype)
    yield model, tokenizer
    del model
    gc.collect()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M in float32 (real weights, offline)."""
    yield from _embedded("smollm2-135m", "float32")


@pytest.fixture(scope="module")
def smollm2_f64():
    """SmolLM2-135M in float64."""
    yield from _embedded("smollm2-135m", "float64")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M in float32."""
    yield from _embedded("gemma3-270m", "float32")


@pytest.fixture(scope="module")
def gemma3_f64():
    """Gemma 3 270M in float64 (2.1 GB)."""
    yield from _embedded("gemma3-270m", "float64")


@pytest.fixture(scope="session")
def qwen():
    """Qwen2.5-Coder-0.5B in float32."""
    yield from _embedded("qwen2.5-coder-0.5b", "float32")


@pytest.fixture(scope="module")
def qwen_f64():
    """Qwen2.5-Coder-0.5B in float64 (4 GB)."""
    yield from _embedded("qwen2.5-coder-0.5b", "float64")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> pathlib.Path:
    """LLLM_CACHE_DIR pointed at an empty directory (models, dense copies and results go there)."""
    monkeypatch.setenv("LLLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def cli_error(capsys):
    """cli_error(*argv) runs `lllm argv` in this process and asserts what a user must see when it fails: exit
    code 2, exactly one line on stderr, no traceback. Returns that line."""
    from lllm.apps import cli

    def run(*argv: str) -> str:
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:  # argparse exits on a usage error
            code = exit_.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, err
        assert len(lines) == 1, err
        assert "Traceback" not in err
        return lines[0]

    return run


@pytest.fixture
def cli_smollm2(monkeypatch, smollm2):
    """`lllm` commands run in this process (lllm.apps.cli.main) get the session's SmolLM2 from lllm.load instead
    of loading it again; any other model or dtype fails the test. Loading itself is tested in test_models."""
    import lllm
    import torch

    def load(name, dtype=torch.float32, device="cpu"):
        assert (name, dtype, str(device)) == ("smollm2-135m", torch.float32, "cpu"), (name, dtype, device)
        return smollm2

    monkeypatch.setattr(lllm, "load", load)
    return smollm2
