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


# fixture -> (embedded model, dtype, scope): each float32 model once per session, its float64 copy once per module
EMBEDDED = {
    "smollm2": ("smollm2-135m", "float32", "session"),
    "smollm2_f64": ("smollm2-135m", "float64", "module"),
    "gemma3": ("gemma3-270m", "float32", "session"),
    "gemma3_f64": ("gemma3-270m", "float64", "module"),  # 2.1 GB
    "qwen": ("qwen2.5-coder-0.5b", "float32", "session"),
    "qwen_f64": ("qwen2.5-coder-0.5b", "float64", "module"),  # 4 GB
}


def _embedded_fixture(fixture: str, name: str, dtype: str, scope: str):
    """A fixture giving (model, tokenizer) of an embedded model from lllm.load, released at the end of `scope`."""

    def load():
        import lllm

        model, tokenizer = lllm.load(name, dtype=dtype)
        yield model, tokenizer
        del model
        gc.collect()

    load.__doc__ = f"{name} in {dtype} (real weights, offline), loaded once per {scope}."
    return pytest.fixture(scope=scope, name=fixture)(load)


for _fixture, (_name, _dtype, _scope) in EMBEDDED.items():
    globals()[_fixture] = _embedded_fixture(_fixture, _name, _dtype, _scope)


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
