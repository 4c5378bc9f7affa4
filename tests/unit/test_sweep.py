"""Tests of lllm.apps.sweep on a tiny seeded model: engines agree, a killed sweep resumes, failures are rows."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny import IdsTokenizer, tiny_model

from lllm import detached_jacobian
from lllm.analyses.decompose import per_token_stable_rank, stable_rank
from lllm.kernel.layers import cumulative_jacobians
from lllm.apps.sweep import (
    COMPONENTS, FAST, TIMING_COLUMNS, PartStore, SweepConfig, SweepError, load_sweep, loads_in_process, local_cluster,
    prompt_id, read_prompts, resolve_layers, run_sweep, stable_rank_long, summarize_sweep,
)

REPO = Path(__file__).resolve().parent.parent
LOADER = "test_sweep:tiny_loader"  # importable by Dask workers and CLI subprocesses (tests/ on their path)
MODEL = "tiny:llama"


def tiny_loader(name: str, dtype: torch.dtype):
    """(model, tokenizer) for "tiny:<family>": seeded, so every process builds the same weights."""
    return tiny_model(name.removeprefix("tiny:"), dtype, seed=0), IdsTokenizer()


class _SlowTokenizer(IdsTokenizer):
    """IdsTokenizer that sleeps 50 ms per prompt (a model hook would be refused by the class-name adapters)."""

    def __call__(self, text: str):
        time.sleep(0.05)
        return super().__call__(text)


def slow_tiny_loader(name: str, dtype: torch.dtype):
    """tiny_loader whose every prompt first sleeps 50 ms, so that a signal lands while prompts are running."""
    model, _ = tiny_loader(name, dtype)
    return model, _SlowTokenizer()


def id_prompts(n: int, lengths: tuple[int, int], seed: int) -> list[str]:
    """n distinct prompts of the tiny tokenizer: space-separated token ids."""
    rng = random.Random(seed)
    return [" ".join(str(rng.randrange(3, 96)) for _ in range(rng.randint(*lengths))) for _ in range(n)]


def _plain(df) -> list[dict]:
    """Rows as plain Python values (lists, floats, None) without the timing columns, for exact comparison."""
    return pa.Table.from_pandas(df.drop(columns=list(TIMING_COLUMNS)), preserve_index=False).to_pylist()


def sweep(out: Path, prompts, **kw):
    """run_sweep on the tiny model in float64, one thread, without a progress bar."""
    return run_sweep(MODEL, prompts, out, loader=LOADER, dtype="float64", threads=1, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# The rows are right
# ---------------------------------------------------------------------------------------------


def test_row_agrees_with_independent_computation(tmp_path):
    prompt = "5 17 33 8 61 2 40"
    row = sweep(tmp_path / "r.parquet", [prompt], method="forward").iloc[0]
    model, tok = tiny_loader(MODEL, torch.float64)
    assert pd.isna(row["error"])
    # the final J⁺ came from the cumulative (forward) sweep; the reverse-mode J⁺ must agree with it
    assert row["final_method"] == "forward"
    reverse = detached_jacobian(model, tok, prompt, progress=False)
    assert row["reconstruction_error"] < 1e-12
    assert list(row["token_stable_ranks"]) == pytest.approx(per_token_stable_rank(reverse).tolist(), rel=1e-9)
    assert row["stable_rank"] == pytest.approx(stable_rank(reverse.combined), rel=1e-9)
    # cumulative stable ranks (Gram route) against SVDs of the layers module's own Jacobians
    cum = cumulative_jacobians(model, tok, prompt, progress=False)
    for comp in COMPONENTS:
        expected = [stable_rank(cum.combined(comp, ell)) for ell in cum.layers]
        assert list(row[f"cumulative_stable_rank_{comp}"]) == pytest.approx(expected, rel=1e-9)
    # next tokens: the model's own softmax, best first
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([reverse.token_ids])).logits[0, -1].double(), -1)
    top = torch.topk(probs, 5)
    assert list(row["next_token_ids"]) == top.indices.tolist()
    assert list(row["next_probs"]) == pytest.approx(top.values.tolist(), rel=1e-12)
    # u₁ of the last block, oriented toward y, decoded through lm_head
    U, S, _ = torch.linalg.svd(reverse.block(-1))
    u1 = U[:, 0] * torch.sign(U[:, 0] @ reverse.output)
    assert row["u_token_ids"][0] == int(torch.argmax(model.lm_head(u1)))
    assert list(row["u_singular_values"]) == pytest.approx(S[:3].tolist(), rel=1e-9)
    assert row["u1_matches_prediction"] == (row["u_token_ids"][0] == row["next_token_ids"][0])


def test_fast_preset_and_no_layers_agree_with_the_faithful_rows(tmp_path):
    prompts = ["5 17 33 8 61 2 40", "9 9 12"]
    faithful = sweep(tmp_path / "all.parquet", prompts)
    fast = sweep(tmp_path / "fast.parquet", prompts, **FAST)  # every:3 of 2 layers is the last one, reversed
    bare = sweep(tmp_path / "none.parquet", prompts, layers="none")
    for i in range(len(prompts)):
        assert fast.loc[i, "final_method"] == bare.loc[i, "final_method"] == "reverse"
        assert list(fast.loc[i, "layers"]) == [1] and list(bare.loc[i, "layers"]) == []
        assert fast.loc[i, "cumulative_stable_rank_attn"] is None
        assert bare.loc[i, "cumulative_stable_rank_layer"] is None
        assert fast.loc[i, "cumulative_stable_rank_layer"][0] == pytest.approx(
            faithful.loc[i, "cumulative_stable_rank_layer"][1], rel=1e-9)
        for other in (fast, bare):
            assert other.loc[i, "reconstruction_error"] < 1e-12
            assert list(other.loc[i, "token_stable_ranks"]) == pytest.approx(
                list(faithful.loc[i, "token_stable_ranks"]), rel=1e-9)
            assert list(other.loc[i, "u_token_ids"]) == list(faithful.loc[i, "u_token_ids"])


def test_resolve_layers():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("none", 4) == []
    assert resolve_layers("every:4", 30) == [1, 5, 9, 13, 17, 21, 25, 29]  # always ends at the last layer
    assert resolve_layers("0,-1", 30) == [0, 29]
    for bad in ("every:0", "some", "1,x", "30"):
        with pytest.raises(SweepError):
            resolve_layers(bad, 30)


def test_bundled_prompt_set():
    prompts = read_prompts()
    assert len(prompts) >= 100 and len({prompt_id(p) for p in prompts}) == len(prompts)
    paper = ["The bridge out of Marin is the", "The Golden", "The lightning", "There was thunder and",
             "A fluffy blue creature roamed the", "I'm going to arizona to see the", "Here is a painting of the",
             "I went to new york to see the"]
    assert set(paper) <= set(prompts)
    assert all(2 <= len(p.split()) <= 12 and not p.startswith("#") for p in prompts)


# ---------------------------------------------------------------------------------------------
# 1. Dask engine == local engine, with one model load per worker process
# ---------------------------------------------------------------------------------------------


def test_dask_engine_rows_equal_local_rows_and_each_worker_loads_once(tmp_path):
    prompts = id_prompts(12, (3, 12), seed=1)
    local = sweep(tmp_path / "local.parquet", prompts, engine="local", batch_size=2)
    with local_cluster(2) as cluster:  # 2 worker processes, 1 thread each, on 127.0.0.1, no dashboard
        dask = sweep(tmp_path / "dask.parquet", prompts, engine="dask", batch_size=2,
                     scheduler=cluster.scheduler_address)
        from distributed import Client

        with Client(cluster) as client:
            loads = client.run(loads_in_process)
    assert local["error"].isna().all()
    # same code, same thread count (1): every float is bitwise the same in both engines
    assert _plain(dask) == _plain(local)
    key = f"{LOADER}|{MODEL}|float64"
    per_worker = [info["loads"].get(key, 0) for info in loads.values()]
    assert len({info["pid"] for info in loads.values()}) == 2 and os.getpid() not in {i["pid"] for i in loads.values()}
    assert max(per_worker) == 1 and sum(per_worker) >= 1  # 6 batches, at most one load per process
    assert PartStore(tmp_path / "dask.parquet").runs()[-1]["model_loads"] == loads


# ---------------------------------------------------------------------------------------------
# 2. A killed sweep resumes with only the missing prompts
# ---------------------------------------------------------------------------------------------


def cli_sweep_past_its_first_commit(prompt_file: Path, out: Path, loader: str, *options: str) -> subprocess.Popen:
    """`lllm sweep` on the tiny model in a subprocess (stderr piped as text), returned once a part is committed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    cmd = [sys.executable, "-m", "lllm.apps.cli", "sweep", "--model", MODEL, "--loader", loader, "--prompts",
           str(prompt_file), "--out", str(out), "--dtype", "float64", "--no-progress", *options]
    # SIGINT as the terminal sends it; a child of a non-interactive shell may inherit it ignored, so restore it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    store = PartStore(out)
    deadline = time.monotonic() + 120
    while not (store.dir.is_dir() and store.parts()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


def test_killed_sweep_resumes_computing_only_missing_prompts(tmp_path):
    prompts = id_prompts(40, (40, 60), seed=2)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# tiny-model prompts\n" + "\n".join(prompts) + "\n")
    out = tmp_path / "killed.parquet"
    proc = cli_sweep_past_its_first_commit(prompt_file, out, LOADER)
    store = PartStore(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    committed = len(store.read())
    assert not out.exists() and 1 <= committed < len(prompts), "the kill must land after a commit, before the end"

    resumed = sweep(out, prompt_file)
    run = store.runs()[-1]
    assert run["already_done"] == committed and run["computed"] == len(prompts) - committed
    assert len(store.read()) == len(prompts)  # the parts hold each prompt once: nothing computed twice
    uninterrupted = sweep(tmp_path / "whole.parquet", prompt_file)
    assert list(resumed["prompt"]) == prompts and resumed["prompt_id"].is_unique
    assert _plain(resumed) == _plain(uninterrupted)
    assert pq.read_table(out).num_rows == len(prompts)


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_ctrl_c_stops_the_sweep_keeps_its_rows_and_the_rerun_completes_it(tmp_path, engine):
    prompts = id_prompts(12, (3, 6), seed=4)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "interrupted.parquet"
    proc = cli_sweep_past_its_first_commit(prompt_file, out, "test_sweep:slow_tiny_loader", "--engine", engine)
    store = PartStore(out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    committed = len(store.read())
    assert proc.returncode == 130, err
    assert not out.exists() and 1 <= committed < len(prompts), "the signal must land after a commit, before the end"
    assert f"interrupted; {committed} prompts are committed" in err and "Traceback" not in err.split("interrupted")[-1]

    resumed = run_sweep(MODEL, prompt_file, out, loader="test_sweep:slow_tiny_loader", dtype="float64", progress=False)
    assert store.runs()[-1]["already_done"] == committed
    assert _plain(resumed) == _plain(sweep(tmp_path / "whole.parquet", prompt_file))  # the sleep changes no number


def test_rerun_of_a_finished_sweep_computes_nothing_and_new_prompts_only(tmp_path):
    out = tmp_path / "s.parquet"
    first = id_prompts(3, (3, 6), seed=3)
    sweep(out, first)
    sweep(out, first)
    assert PartStore(out).runs()[-1]["computed"] == 0
    more = id_prompts(5, (3, 6), seed=4)
    df = sweep(out, first + more)
    assert PartStore(out).runs()[-1]["computed"] == len(more)
    assert list(df["prompt_index"]) == list(range(8)) and list(df["prompt"]) == first + more


def test_parts_of_another_config_or_a_second_driver_are_refused(tmp_path):
    out = tmp_path / "s.parquet"
    sweep(out, ["3 4 5"])
    with pytest.raises(SweepError, match="another sweep"):
        sweep(out, ["3 4 5"], layers="none")
    holder = PartStore(out)
    holder.open(SweepConfig(**{**_stored_config(out), "components": tuple(COMPONENTS)}))
    try:
        with pytest.raises(SweepError, match="another sweep is writing"):
            sweep(out, ["3 4 5"])
    finally:
        holder.close()


def _stored_config(out: Path) -> dict:
    import json

    return json.loads((PartStore(out).dir / PartStore.MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------
# 3. A prompt that raises is a row with its error, and the sweep goes on
# ---------------------------------------------------------------------------------------------


def test_failing_prompts_record_their_error_and_the_sweep_continues(tmp_path):
    too_long = " ".join(["7"] * 200)  # the tiny model has 128 positions
    prompts = ["3 4 5", "", too_long, "9 500", "10 11 12"]
    df = sweep(tmp_path / "e.parquet", prompts)
    assert list(df["prompt"]) == prompts
    errors = df["error"].tolist()
    assert pd.isna(errors[0]) and pd.isna(errors[4])
    assert errors[1].startswith("PromptError") and "empty" in errors[1]
    assert errors[2].startswith("PromptError") and "128 positions" in errors[2]
    assert errors[3].startswith("PromptError") and "outside the vocabulary" in errors[3]
    assert df.loc[1, "reconstruction_error"] is None or math.isnan(df.loc[1, "reconstruction_error"])
    assert PartStore(tmp_path / "e.parquet").runs()[-1]["failed_prompts"] == 3


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def test_summary_and_long_form(tmp_path):
    df = sweep(tmp_path / "s.parquet", id_prompts(6, (3, 8), seed=5) + [""])
    long = stable_rank_long(df)
    assert len(long) == 6 * 2 * len(COMPONENTS)  # failed row excluded; 2 layers × 3 components each
    first = df.iloc[0]
    mlp = long[(long.prompt_id == first.prompt_id) & (long.component == "mlp")]
    assert mlp["stable_rank"].tolist() == list(first["cumulative_stable_rank_mlp"])
    summary = summarize_sweep(df)
    assert summary["n_prompts"] == 7 and summary["n_failed"] == 1
    assert summary["u1_match_rate"] == df["u1_matches_prediction"].iloc[:6].mean()
    top3 = [df.loc[i, "next_token_ids"][0] in list(df.loc[i, "u_token_ids"]) for i in range(6)]
    assert summary["u_top3_match_rate"] == sum(top3) / 6
    medians = summary["stable_rank_by_layer"].set_index(["component", "layer"])["50%"]
    for comp in COMPONENTS:
        for ell in (0, 1):
            assert medians[(comp, ell)] == long[(long.component == comp) & (long.layer == ell)].stable_rank.median()
    assert set(summary["depth_vs_stable_rank"]) == set(COMPONENTS)
    assert load_sweep(tmp_path / "s.parquet").equals(df)


def test_a_loader_that_does_not_resolve_is_refused_before_any_prompt(tmp_path):
    with pytest.raises(SweepError, match="not an importable module:function"):
        run_sweep(MODEL, ["3 4 5"], tmp_path / "s.parquet", loader="test_sweep:no_such_loader", progress=False)
    assert PartStore(tmp_path / "s.parquet").parts() == []
