"""lllm.apps.sweep on a tiny seeded model, in this process: the rows are right, reruns compute only what is
missing, failures are rows, summaries. tests/e2e/test_sweep.py runs it on Dask workers and kills CLI runs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from tiny import SWEEP_MODEL as MODEL
from tiny import id_prompts, tiny_loader
from tiny import tiny_sweep as sweep

from lllm import detached_jacobian
from lllm.analyses.decompose import per_token_stable_rank, stable_rank
from lllm.kernel.layers import cumulative_jacobians
from lllm.apps.sweep import (
    FAST, PartStore, SweepConfig, load_sweep, prompt_id, read_prompts, resolve_layers, run_sweep, stable_rank_long,
    summarize_sweep,
)
from lllm.errors import SweepError
from lllm.kernel.layers import COMPONENTS


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
# Reruns compute only what is missing
# ---------------------------------------------------------------------------------------------


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


def _stored_config(out) -> dict:
    return json.loads((PartStore(out).dir / PartStore.MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------
# A prompt that raises is a row with its error, and the sweep goes on
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
        run_sweep(MODEL, ["3 4 5"], tmp_path / "s.parquet", loader="tiny:no_such_loader", progress=False)
    assert PartStore(tmp_path / "s.parquet").parts() == []
