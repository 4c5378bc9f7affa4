"""lllm.io.store: bit-identical round trips, content-addressed cache, corruption detection, atomic writes."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from tiny import IdsTokenizer, tiny_model

from lllm import detached_jacobian
from lllm.io import store
from lllm.errors import CacheError
from lllm.io.codecs import computation_fields, model_identity, record_to_result, result_to_record
from lllm.io.store import META_FILE, TENSORS_FILE, ResultCache, load_result, save_result


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that -0.0 ≠ 0.0 and NaN payloads count."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def sample_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the package stores, with values that a lossy path would change."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 5e-324, 1.0 + 2**-52], dtype=torch.float64)
    return {
        "f64": torch.cat([torch.randn(20, generator=g, dtype=torch.float64), special]).reshape(2, 13),
        "f32": torch.randn(3, 4, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64),
        "view": torch.randn(8, 8, generator=g)[2],  # a view into a larger storage, as an output row is
        "transposed": torch.randn(3, 5, generator=g).T,
    }


def sample_meta(**options) -> dict:
    return computation_fields(None, "the prompt", token_ids=[1, 2, 3], dtype=torch.float64, options=options)


@pytest.fixture
def cache(tmp_path) -> ResultCache:
    return ResultCache(tmp_path / "cache")


class Counter:
    """A compute() that counts its calls and always returns the same tensors."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return sample_tensors(), {"note": "computed"}


# ----------------------------------------------------------------------------- save / load


def test_round_trip_is_bit_identical(tmp_path):
    tensors = sample_tensors()
    path = save_result(tmp_path / "entry", tensors, sample_meta(k=3, eps=0.1))
    loaded, meta = load_result(path)
    assert_bit_identical(tensors, loaded)
    assert meta["prompt"] == "the prompt" and meta["token_ids"] == [1, 2, 3]
    assert meta["dtype"] == "float64" and meta["options"] == {"k": 3, "eps": 0.1}
    assert set(meta["versions"]) >= {"lllm", "torch", "transformers"}
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["tensors"]["bf16"] == {"dtype": "bfloat16", "shape": [7]}
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, TENSORS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temporaries left behind


def test_save_replaces_an_entry_but_not_other_directories(tmp_path):
    path = save_result(tmp_path / "entry", {"a": torch.zeros(2)}, sample_meta())
    save_result(path, {"b": torch.ones(3)}, sample_meta())
    assert_bit_identical(load_result(path)[0], {"b": torch.ones(3)})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a result entry"):
        save_result(other, {"a": torch.zeros(2)}, sample_meta())
    assert (other / "notes.txt").read_text() == "mine"


def test_save_refuses_incomplete_metadata_and_non_tensors(tmp_path):
    with pytest.raises(CacheError, match="lacks"):
        save_result(tmp_path / "e", {"a": torch.zeros(2)}, {"prompt": "x"})
    with pytest.raises(CacheError, match="str names to tensors"):
        save_result(tmp_path / "e", {"a": None}, sample_meta())
    with pytest.raises(CacheError, match="cannot store"):
        save_result(tmp_path / "e", {"a": torch.zeros(2)}, sample_meta(fn=print))
    assert not (tmp_path / "e").exists()


def truncate_tensors(path):
    data = (path / TENSORS_FILE).read_bytes()
    (path / TENSORS_FILE).write_bytes(data[: len(data) // 2])


def flip_tensor_byte(path):
    data = bytearray((path / TENSORS_FILE).read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data, past the header
    (path / TENSORS_FILE).write_bytes(bytes(data))


def flip_tensor_header_byte(path):
    data = bytearray((path / TENSORS_FILE).read_bytes())
    data[3] ^= 0x40  # the header length: unparseable
    (path / TENSORS_FILE).write_bytes(bytes(data))


def garbage_json(path):
    (path / META_FILE).write_text("{ this is not json")


def edit_meta_value(path):
    """Valid JSON, plausible content, wrong value: only the digest in the tensors header can tell."""
    meta = json.loads((path / META_FILE).read_text())
    meta["options"]["k"] = 4
    (path / META_FILE).write_text(json.dumps(meta))


CORRUPTIONS = {
    "truncated tensors": truncate_tensors,
    "flipped tensor byte": flip_tensor_byte,
    "flipped header byte": flip_tensor_header_byte,
    "garbage json": garbage_json,
    "edited meta value": edit_meta_value,
    "missing tensors": lambda path: (path / TENSORS_FILE).unlink(),
    "missing meta": lambda path: (path / META_FILE).unlink(),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corruption_is_detected_on_load(tmp_path, corrupt):
    path = save_result(tmp_path / "entry", sample_tensors(), sample_meta(k=3))
    corrupt(path)
    with pytest.raises(CacheError):
        load_result(path)


def test_missing_entry_is_a_cache_error(tmp_path):
    with pytest.raises(CacheError, match="no such directory"):
        load_result(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the cache


def test_hit_returns_bit_identical_tensors_without_computing(cache):
    compute = Counter()
    fields = sample_meta(k=3)
    first, meta1, hit1 = cache.get_or_compute("svd", fields, compute)
    second, meta2, hit2 = cache.get_or_compute("svd", fields, compute)
    assert (hit1, hit2, compute.calls) == (False, True, 1)
    assert_bit_identical(first, second)
    assert_bit_identical(second, sample_tensors())
    assert meta1 == meta2  # a miss returns exactly the metadata that a later hit reads
    assert meta2["note"] == "computed" and meta2["prompt"] == "the prompt" and meta2["cache"]["kind"] == "svd"


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_recomputed_and_rewritten(cache, corrupt, caplog):
    compute = Counter()
    fields = sample_meta(k=3)
    cache.get_or_compute("svd", fields, compute)
    path = cache.path("svd", cache.key("svd", fields))
    corrupt(path)
    tensors, _, hit = cache.get_or_compute("svd", fields, compute)
    assert (hit, compute.calls) == (False, 2)
    assert "corrupt cache entry" in caplog.text
    assert_bit_identical(tensors, sample_tensors())
    assert_bit_identical(load_result(path)[0], sample_tensors())  # rewritten whole
    assert cache.get_or_compute("svd", fields, compute)[2] is True
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no trash or temporaries left


def test_entry_under_the_wrong_key_is_not_a_hit(cache):
    compute = Counter()
    fields_a, fields_b = sample_meta(k=3), sample_meta(k=4)
    cache.get_or_compute("svd", fields_a, compute)
    path_a = cache.path("svd", cache.key("svd", fields_a))
    os.replace(path_a, cache.path("svd", cache.key("svd", fields_b)))  # a valid entry, misfiled
    assert cache.get_or_compute("svd", fields_b, compute)[2] is False
    assert compute.calls == 2


def test_interrupted_write_leaves_no_entry(cache, monkeypatch):
    compute = Counter()
    fields = sample_meta(k=3)
    path = cache.path("svd", cache.key("svd", fields))

    def replace_interrupted(src, dst):
        raise KeyboardInterrupt  # the process is stopped just before the rename that publishes

    monkeypatch.setattr(store.os, "replace", replace_interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute("svd", fields, compute)
    monkeypatch.undo()
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # the temporary was removed on the way out
    _, _, hit = cache.get_or_compute("svd", fields, compute)
    assert (hit, compute.calls) == (False, 2)


def test_temporary_of_a_killed_writer_is_invisible_and_cleaned_up(cache):
    """A writer killed before its rename leaves a complete but hidden temporary: never a hit."""
    compute = Counter()
    fields = sample_meta(k=3)
    path = cache.path("svd", cache.key("svd", fields))
    dead = path.with_name(f".{path.name}.tmp-deadbeef")
    save_result(dead, {"stale": torch.zeros(1)}, {**fields, "cache": {"kind": "svd", "key": path.name}})
    old = time.time() - 2 * store.STALE_TEMPORARY_SECONDS
    os.utime(dead, (old, old))
    tensors, _, hit = cache.get_or_compute("svd", fields, compute)
    assert (hit, compute.calls) == (False, 1)
    assert_bit_identical(tensors, sample_tensors())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_key_being_computed_is_waited_for_and_read_not_computed_twice(cache):
    """Two notebooks asking for the same analysis at once: one computes it, the other waits and reads it."""
    started, release = threading.Event(), threading.Event()
    fields = sample_meta(k=3)
    outcomes, errors, calls = [], [], []

    def compute():
        calls.append(1)
        started.set()
        release.wait(30)  # the second caller arrives while this one computes
        return sample_tensors(), {}

    def worker():
        try:
            outcomes.append(cache.get_or_compute("svd", fields, compute))
        except BaseException as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    first = threading.Thread(target=worker)
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=worker)
    second.start()
    time.sleep(0.5)
    assert second.is_alive()  # waiting on the key's lock
    release.set()
    for t in (first, second):
        t.join(30)
    assert errors == [] and len(calls) == 1
    assert sorted(hit for _, _, hit in outcomes) == [False, True]
    path = cache.path("svd", cache.key("svd", fields))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert_bit_identical(outcomes[1][0], sample_tensors())


def test_keys_separate_what_was_computed(cache):
    model = tiny_model("llama")
    base = computation_fields(model, "5 6 7", dtype=torch.float32, options={"k": 3})
    variants = {
        "options": computation_fields(model, "5 6 7", dtype=torch.float32, options={"k": 4}),
        "dtype": computation_fields(model, "5 6 7", dtype=torch.float64, options={"k": 3}),
        "prompt": computation_fields(model, "5 6 8", dtype=torch.float32, options={"k": 3}),
        "ids": computation_fields(model, [5, 6, 7], dtype=torch.float32, options={"k": 3}),
        "weights": computation_fields(tiny_model("llama", seed=1), "5 6 7", dtype=torch.float32, options={"k": 3}),
        "family": computation_fields(tiny_model("qwen2"), "5 6 7", dtype=torch.float32, options={"k": 3}),
    }
    keys = {name: cache.key("jacobian", fields) for name, fields in variants.items()}
    keys["kind"] = cache.key("svd", base)
    keys["base"] = cache.key("jacobian", base)
    assert len(set(keys.values())) == len(keys), keys
    reordered = {name: base[name] for name in reversed(list(base))}
    assert cache.key("jacobian", reordered) == keys["base"]
    assert cache.key("jacobian", computation_fields(model, "5 6 7", options={"k": 3})) == keys["base"]


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLLM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert ResultCache().root == tmp_path / "elsewhere" / "results"


def test_kind_must_name_a_directory(cache):
    with pytest.raises(CacheError, match="kind"):
        cache.get_or_compute("../escape", sample_meta(), Counter())


# ----------------------------------------------------------------------------- model identity


def test_model_identity_tracks_weights_and_provenance():
    model = tiny_model("llama")
    identity = model_identity(model)
    assert identity["name"] == "LlamaForCausalLM" and identity["family"] == "llama"
    assert identity == model_identity(tiny_model("llama"))  # same config and seed: same weights
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0  # an in-place edit must not be hidden by the memo
    assert model_identity(model)["weights_sha256"] != identity["weights_sha256"]
    assert model_identity(model)["config_sha256"] == identity["config_sha256"]
    model.lllm_source = {"name": "smollm2-135m", "path": "/x.gguf", "sha256": "ab" * 32, "family": "llama"}
    assert model_identity(model) == {"name": "smollm2-135m", "family": "llama", "sha256": "ab" * 32}


# ----------------------------------------------------------------------------- JacobianResult records


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2 has biases, llama has none
def test_jacobian_result_round_trips(tmp_path, family):
    model = tiny_model(family, dtype=torch.float64)
    result = detached_jacobian(model, IdsTokenizer(), "5 6 7 8", progress=False)
    assert (result.bias is None) == (family == "llama")
    tensors, meta = result_to_record(result, model, "5 6 7 8", options={"position": -1})
    back = record_to_result(*load_result(save_result(tmp_path / "j", tensors, meta)))
    for name in ("jacobian", "inputs", "output"):
        assert torch.equal(bits(getattr(back, name)), bits(getattr(result, name))), name
    if result.bias is None:
        assert back.bias is None
    else:
        assert torch.equal(bits(back.bias), bits(result.bias))
    assert back.relative_error == result.relative_error
    assert result.relative_error < 1e-9  # it is a real, exact linearization that went through the store
    assert (back.token_ids, back.tokens) == (result.token_ids, result.tokens) == ([5, 6, 7, 8], result.tokens)
    assert (back.detached, back.position, back.mlp_split, back.seconds) == (
        result.detached, result.position, result.mlp_split, result.seconds)
    assert meta["model"] == model_identity(model) and meta["dtype"] == "float64"


def test_record_to_result_refuses_other_records():
    with pytest.raises(CacheError, match="not a JacobianResult"):
        record_to_result(sample_tensors(), sample_meta())
