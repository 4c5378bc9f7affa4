"""Bad input and bad luck, tried as a user would: each case gives the exact lllm error (or the right result).

The CLI cases also check what a user sees (the `cli_error` fixture): exit code 2, one line on stderr, no
traceback, and every input file unchanged. tests/integration/test_bad_input.py tries the CLI on SmolLM2.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
import torch
from tiny import FLAKY, IdsTokenizer, tiny_model

import lllm
from lllm.kernel.jacobian import embed
from lllm.apps import cli
from lllm.io import models
from lllm.analyses.pipeline import cached_analyze
from lllm.errors import (
    ArgumentError, LLLMError, ModelFileError, OperatorError, OutputPathError, PromptError, SweepError,
    UnknownModelError,
)
from lllm.io.store import ResultCache
from lllm.apps.sweep import run_sweep

TOK = IdsTokenizer()
PROMPT = "3 4 5"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", torch.float64)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# lllm.load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, error", [
    ("", UnknownModelError), ("   ", UnknownModelError), (None, ArgumentError), (42, ArgumentError),
    ("no-such-model", UnknownModelError),
])
def test_load_refuses_a_bad_name(name, error):
    with pytest.raises(error):
        lllm.load(name)


@pytest.mark.parametrize("kw", [{"device": "banana"}, {"device": "cuda:7"}] + [
    {"dtype": dtype} for dtype in ("int8", torch.int64, torch.bool, "float65", "int32", 32, None)])
def test_load_refuses_a_bad_device_or_dtype_before_loading(kw, monkeypatch):
    if kw.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    monkeypatch.setattr(models, "resolve_source", lambda name: pytest.fail("resolved the model before checking"))
    with pytest.raises(ArgumentError, match="floating dtype" if "dtype" in kw else None):
        lllm.load("smollm2-135m", **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_load_on_cuda_without_cuda_is_refused_before_loading():
    with pytest.raises(ArgumentError, match="not available on this machine"):
        lllm.load("smollm2-135m", device="cuda")


def _tokenizer_dir(path: Path) -> None:
    """A real (tiny) fast tokenizer saved in path, so that only the weights can be wrong."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({str(i): i for i in range(96)} | {"<unk>": 96}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)


def test_a_directory_with_a_truncated_model_file_is_a_model_file_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    _tokenizer_dir(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="could not load"):
        lllm.load(tmp_path)


def test_an_interrupted_dense_copy_leaves_nothing_behind(tmp_path, monkeypatch):
    """Ctrl-C while the dense copy is written: the temporary directory is removed at once."""
    monkeypatch.setenv("LLLM_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")

    def interrupted(path, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 100_000)
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", interrupted)
    target = tmp_path / "dense" / "abc-tf5-float32"
    with pytest.raises(KeyboardInterrupt):
        models.write_dense_copy(model, TOK, target, "abc")
    assert list((tmp_path / "dense").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The Jacobian engines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error", [
    ({"position": 3}, PromptError), ({"position": -4}, PromptError), ({"position": "last"}, ArgumentError),
    ({"position": 1.0}, ArgumentError), ({"position": True}, ArgumentError),
    ({"chunk_size": -1}, ArgumentError), ({"chunk_size": 0}, ArgumentError), ({"chunk_size": 2.5}, ArgumentError),
    ({"chunk_size": "64"}, ArgumentError), ({"mlp_split": "bogus"}, ArgumentError),
])
def test_detached_jacobian_refuses_bad_options(tiny, kw, error):
    with pytest.raises(error):
        lllm.detached_jacobian(tiny, TOK, PROMPT, progress=False, **kw)


def test_ordinary_jacobian_refuses_a_negative_chunk_size(tiny):
    """It used to return uninitialised memory as J (values up to 1e17)."""
    with pytest.raises(ArgumentError, match="chunk_size"):
        lllm.ordinary_jacobian(tiny, TOK, PROMPT, chunk_size=-1, progress=False)


@pytest.mark.parametrize("ids, error", [
    ([1.7, 2.2], ArgumentError), (torch.tensor([1.0, 2.0]), ArgumentError), ([[1, 2], [3, 4]], ArgumentError),
    ([True, False], ArgumentError), (None, PromptError), ([], PromptError), (["a", "b"], ArgumentError),
    ([1, 2, 500], PromptError), ([-1, 2], PromptError),
])
def test_bad_token_ids_are_refused(tiny, ids, error):
    out_of_range = isinstance(ids, list) and any(isinstance(i, int) and not 0 <= i < 96 for i in ids)
    with pytest.raises(error, match="vocabulary" if out_of_range else None):
        lllm.detached_jacobian(tiny, TOK, ids, progress=False)


def test_a_one_row_batch_of_ids_is_one_prompt(tiny):
    one = lllm.detached_jacobian(tiny, TOK, [3, 4, 5], progress=False)
    batch = lllm.detached_jacobian(tiny, TOK, torch.tensor([[3, 4, 5]]), progress=False)
    assert batch.token_ids == [3, 4, 5] and torch.equal(one.jacobian, batch.jacobian)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_detached_jacobian_works_under_no_grad_and_inference_mode(tiny, context):
    """Users call it from evaluation code: it enables autograd inside and gives the same J⁺."""
    reference = lllm.detached_jacobian(tiny, TOK, PROMPT, progress=False)
    with context():
        result = lllm.detached_jacobian(tiny, TOK, PROMPT, progress=False)
        layers = lllm.cumulative_jacobians(tiny, TOK, PROMPT, layers=[-1], progress=False)
    assert torch.equal(result.jacobian, reference.jacobian) and result.relative_error < 1e-12
    assert max(layers.relative_errors("layer")) < 1e-12


@pytest.mark.parametrize("kw, error", [
    ({"layers": []}, ArgumentError), ({"layers": [2]}, ArgumentError), ({"layers": [-3]}, ArgumentError),
    ({"layers": [100]}, ArgumentError), ({"layers": ["0"]}, ArgumentError), ({"layers": 1}, ArgumentError),
    ({"components": ["attention"]}, ArgumentError), ({"components": "layer"}, ArgumentError),
    ({"components": []}, ArgumentError), ({"method": "sideways"}, ArgumentError), ({"position": 9}, PromptError),
    ({"chunk_size": -1}, ArgumentError),
])
@pytest.mark.parametrize("engine", ["cumulative_jacobians", "layerwise_jacobians"])
def test_layer_readouts_refuse_bad_options(tiny, engine, kw, error):
    """Out-of-range layers used to wrap around silently (layer 2 of 2 reported layer 0)."""
    with pytest.raises(error):
        getattr(lllm, engine)(tiny, TOK, PROMPT, progress=False, **kw)


def test_negative_layers_count_from_the_end(tiny):
    last = lllm.cumulative_jacobians(tiny, TOK, PROMPT, layers=[-1], progress=False)
    assert last.layers == [1]


def test_analyze_checks_its_layers_before_any_work(tiny, monkeypatch):
    monkeypatch.setattr("lllm.analyses.pipeline.detached_jacobian", lambda *a, **k: pytest.fail("computed before checking"))
    with pytest.raises(ArgumentError, match="outside the model's 2 layers"):
        lllm.analyze(tiny, TOK, PROMPT, layers=[2], progress=False)
    with pytest.raises(ArgumentError):
        cached_analyze(tiny, TOK, PROMPT, layers=[], cache=ResultCache("/nonexistent"))


def test_decoding_refuses_what_is_not_an_svd_or_a_vector(tiny):
    result = lllm.detached_jacobian(tiny, TOK, PROMPT, progress=False)
    with pytest.raises(ArgumentError, match="SVD"):
        lllm.decode_svd(None, tiny, TOK)
    with pytest.raises(ArgumentError, match="JacobianResult"):
        lllm.token_svds(result.jacobian)
    with pytest.raises(ArgumentError):
        lllm.decode_output([0.0] * 32, tiny, TOK)
    with pytest.raises(ArgumentError):
        lllm.decode_svd(lllm.token_svds(result)[-1], tiny, TOK, k_vectors=1.5)


def test_the_operator_and_steering_and_generation_refuse_bad_arguments(tiny):
    x = embed(tiny, [3, 4, 5])
    with pytest.raises(PromptError):
        lllm.DetachedOperator(tiny, x, position=3)
    with pytest.raises(ArgumentError):
        lllm.DetachedOperator(tiny, x, chunk_size=-2)
    with pytest.raises(OperatorError):
        lllm.DetachedOperator(tiny, [[0.0] * 32])
    with pytest.raises(ArgumentError):
        lllm.steer(tiny, TOK, "3 4", PROMPT, lam=True)
    with pytest.raises(ArgumentError):
        lllm.steer(tiny, TOK, "3 4", PROMPT, lam=0.5, layer=1.5)
    with pytest.raises(ArgumentError):
        lllm.generate_with_jacobians(tiny, TOK, PROMPT, n_tokens=0, progress=False)


# ---------------------------------------------------------------------------------------------
# Caches that cannot be written
# ---------------------------------------------------------------------------------------------


def test_an_unwritable_results_cache_warns_and_still_returns_the_result(tiny, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    analysis = cached_analyze(tiny, TOK, PROMPT, layers=[-1], cache=ResultCache(blocker / "results"), progress=False)
    assert analysis.meta["relative_error"] < 1e-12
    assert "cannot be written" in caplog.text and blocker.read_text() == "not a directory"


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------


def _sweep(out, prompts, **kw):
    return run_sweep("tiny:llama", prompts, out, loader="tiny:flaky_loader", dtype="float64",
                     layers="none", progress=False, **kw)


def test_retry_failed_recomputes_the_error_rows_only(tmp_path):
    out = tmp_path / "s.parquet"
    FLAKY["fail"] = True
    first = _sweep(out, ["3 4 5", "6 6 6"])
    assert first["error"].isna().tolist() == [True, False] and "transient" in first["error"][1]
    FLAKY["fail"] = False
    assert _sweep(out, ["3 4 5", "6 6 6"])["error"].notna().sum() == 1  # a plain re-run keeps the row
    again = _sweep(out, ["3 4 5", "6 6 6"], retry_failed=True)
    assert again["error"].isna().all() and list(again["prompt"]) == ["3 4 5", "6 6 6"]
    runs = json.loads((tmp_path / "s.parquet.parts" / "runs.jsonl").read_text().splitlines()[-1])
    assert runs["computed"] == 1 and runs["already_done"] == 1


def test_sweep_output_that_is_its_prompt_file_is_refused(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("3 4 5\n")
    before = _digest(prompts)
    with pytest.raises(OutputPathError, match="input file"):
        _sweep(prompts, prompts)
    assert _digest(prompts) == before and not (tmp_path / "p.txt.parts").exists()


@pytest.mark.parametrize("kind", ["directory", "text file", "other parquet"])
def test_sweep_output_that_lllm_did_not_write_is_refused(tmp_path, kind):
    out = tmp_path / "out.parquet"
    if kind == "directory":
        out.mkdir()
    elif kind == "text file":
        out.write_text("my notes")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [1, 2]}), out)
    before = None if out.is_dir() else _digest(out)
    with pytest.raises(OutputPathError):
        _sweep(out, ["3 4 5"])
    assert before is None or _digest(out) == before


def test_prompts_that_are_not_utf8_are_refused(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"3 4 5\n\xff\xfe 6\n")
    with pytest.raises(SweepError, match="line 2"):
        _sweep(tmp_path / "o.parquet", prompts)


def test_a_closed_scheduler_port_is_refused_in_seconds(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(SweepError, match="no Dask scheduler answers"):
        _sweep(tmp_path / "o.parquet", ["3 4 5"], engine="dask", scheduler=f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------------
# The CLI: one line, non-zero, no traceback, inputs unchanged
# ---------------------------------------------------------------------------------------------


def test_cli_refuses_bad_arguments_before_loading(cli_error, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    monkeypatch.setattr(lllm, "load", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    afile = tmp_path / "a-file"
    afile.write_text("mine")
    notes = tmp_path / "results"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\n")
    inputs = {p: _digest(p) for p in (afile, notes / "notes.txt", prompts, bad)}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "analysis-summary.json").write_text('{"my": "notes"}')
    parts = tmp_path / "s.parquet.parts"
    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    inputs = {**inputs, mine / "analysis-summary.json": _digest(mine / "analysis-summary.json"),
              parts / "notes.txt": _digest(parts / "notes.txt")}
    cases = [
        (("jacobian", "--chunk-size", "-1"), "chunk_size must be ≥ 1"),
        (("jacobian", "--top", "0"), "--top must be ≥ 1"),
        (("jacobian", "--device", "cuda:99"), "cuda:99"),
        (("analyze", "--device", "banana", "--out", str(tmp_path / "new")), "not a torch device"),
        (("jacobian", "--prompt", " "), "the prompt is empty"),
        (("analyze", "--prompt", "", "--out", str(tmp_path / "new")), "the prompt is empty"),
        (("analyze", "--out", str(mine)), "lllm did not write it"),
        (("sweep", "--prompts", str(prompts), "--out", str(tmp_path / "s.parquet")), "not the parts directory"),
        (("jacobian", "--save", str(afile / "out")), "which is a file"),
        (("jacobian", "--save", str(afile)), "existing file"),
        (("jacobian", "--save", str(notes)), "lllm did not write"),
        (("jacobian", "--dtype", "float8"), "invalid choice"),
        (("jacobian", "--top", "many"), "invalid int value"),
        (("analyze", "--out", str(afile)), "existing file"),
        (("analyze", "--out", str(afile / "x")), "which is a file"),
        (("analyze", "--out", str(tmp_path), "--method", "sideways"), "invalid choice"),
        (("sweep", "--prompts", str(prompts), "--out", str(prompts)), "input file"),
        (("sweep", "--prompts", str(prompts), "--out", str(afile)), "not a sweep result"),
        (("sweep", "--prompts", str(prompts), "--out", str(notes)), "is a directory"),
        (("sweep", "--prompts", str(bad), "--out", str(tmp_path / "o.parquet")), "not UTF-8"),
        (("sweep", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.parquet")), "cannot read"),
        (("sweep", "--prompts", str(prompts), "--out", str(tmp_path / "o.parquet"), "--layers", "top"), "layers must"),
        (("sweep", "--prompts", str(prompts), "--out", str(tmp_path / "o.parquet"), "--engine", "dask",
          "--scheduler", "tcp://127.0.0.1:1"), "no Dask scheduler"),
        (("sweep", "--prompts", str(prompts), "--out", str(tmp_path / "o.parquet"), "--batch-size", "0"), "≥ 1"),
        (("cache", "explode"), "invalid choice"),
    ]
    for argv, message in cases:
        line = cli_error(*argv)
        assert message in line, (argv, line)
    assert {p: _digest(p) for p in inputs} == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bad.txt", "mine", "p.txt", "results",
                                                          "s.parquet.parts"]
    assert sorted(p.name for p in parts.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("model, error", [("", "empty"), ("no-such-model", "not an embedded model")])
def test_cli_refuses_an_unknown_model_in_one_line(cli_error, model, error):
    line = cli_error("jacobian", "--model", model)
    assert line.startswith("lllm: error:") and error in line


def test_an_output_on_a_read_only_file_system_is_refused_before_any_work(cli_error, tmp_path, monkeypatch):
    monkeypatch.setattr(lllm, "load", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    monkeypatch.setattr("lllm.validation.os.access", lambda path, mode: False)  # as on a read-only mount
    assert "is not writable" in cli_error("jacobian", "--save", str(tmp_path / "out"))
    assert "is not writable" in cli_error("analyze", "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, error", [
    ({"jobs": 0}, ArgumentError), ({"jobs": "2"}, ArgumentError), ({"models": ["smollm2-135m", " "]}, LLLMError),
    ({"dtype": "float8"}, LLLMError),
])
def test_book_refuses_bad_options_before_running_a_notebook(tmp_path, kw, error, monkeypatch):
    from lllm.apps import book
    from lllm.apps.book import site

    monkeypatch.setattr(site, "execute_all", lambda *a, **k: pytest.fail("ran notebooks before refusing"))
    (tmp_path / "_config.yml").write_text("title: t\n")
    with pytest.raises(error):
        book.build_book(**{"models": ["smollm2-135m"], **kw}, prompt="The", book_dir=tmp_path,
                        notebooks_dir=tmp_path, build=False, progress=False)


def test_cache_command_lists_sizes_and_clears(tmp_path, monkeypatch, capsys):
    from lllm.apps.cache import cache_entries

    monkeypatch.setenv("LLLM_CACHE_DIR", str(tmp_path))
    dense = tmp_path / "dense" / (models.EMBEDDED_MODELS["smollm2-135m"].sha256[:16] + "-tf5.23.0-float64")
    dense.mkdir(parents=True)
    (dense / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    (tmp_path / "results" / "analysis" / "k1").mkdir(parents=True)
    (tmp_path / "results" / "analysis" / "k1" / "tensors.safetensors").write_bytes(b"\0" * 3000)
    assert [(e.section, e.bytes) for e in cache_entries()] == [("dense", 2_000_000), ("results", 3000)]
    assert cli.main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m float64" in out and "2.0 MB" in out and "total       2.0 MB" in out
    assert cli.main(["cache", "clear", "--section", "results"]) == 0
    assert "removed 1 entries, 3.0 kB" in capsys.readouterr().out
    assert dense.exists() and not (tmp_path / "results" / "analysis").exists()
    assert cli.main(["cache", "clear"]) == 0 and cache_entries() == []
