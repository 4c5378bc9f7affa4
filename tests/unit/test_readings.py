"""The closing sentence of a figure page reads this page's numbers and compares them with the paper's."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny import SWEEP_MODEL, tiny_loader

from lllm.analyses.pipeline import analyze
from lllm.apps import readings

PROMPT = "5 17 33 8 61 2 40"


@pytest.fixture(scope="module")
def analysis():
    model, tok = tiny_loader(SWEEP_MODEL, torch.float32)
    return analyze(model, tok, PROMPT, progress=False)


def with_meta(analysis, **changes):
    meta = copy.deepcopy(analysis.meta)
    meta.update(changes)
    return dataclasses.replace(analysis, meta=meta)


def test_reconstruction_reads_the_errors_and_the_papers_order(analysis):
    text = readings.reconstruction(analysis, "tiny", "float32")
    assert f"{analysis.meta['relative_error']:.1e}" in text and "as the paper's Fig. 3 reports" in text
    worse = readings.reconstruction(with_meta(analysis, relative_error=3e-4), "tiny", "float32")
    assert "3.0e-04" in worse and "above the paper's order" in worse


def test_depth_reads_the_first_last_and_largest_stable_rank(analysis):
    ranks = analysis.stable_ranks("cumulative")["layer"]
    text = readings.depth(analysis, "tiny", "float32")
    assert f"from {ranks[0]:.2f} at layer {analysis.layers[0]} to {ranks[-1]:.2f}" in text
    assert ("falls" if ranks[-1] < ranks[0] else "rises") in text
    assert f"{max(ranks):.2f}" in text


def test_emergence_finds_the_first_layer_that_decodes_the_prediction(analysis):
    prediction = analysis.meta["next_tokens"][0]["token"]
    rows = copy.deepcopy(analysis.meta["layer_decodings"])
    for row in rows:
        for entry in row:
            entry["tokens"] = ["<none>"]
    assert "does not appear" in readings.emergence(with_meta(analysis, layer_decodings=rows), "tiny", "float32")
    rows[-1][1]["tokens"] = [prediction]
    text = readings.emergence(with_meta(analysis, layer_decodings=rows), "tiny", "float32")
    assert f"first appears among the top three decoded singular vectors at layer {analysis.layers[-1]}" in text


def test_spectra_reads_the_stable_ranks_and_the_top_vector(analysis):
    text = readings.spectra(analysis, "tiny", "float32")
    ranks = analysis.meta["token_stable_rank"]
    assert f"from {min(ranks):.2f} to {max(ranks):.2f}" in text


def test_readings_hold_no_math_markup(analysis):
    """A notebook's markdown output is not typeset: a "$y$" would be shown as it is written."""
    for reading in (readings.reconstruction, readings.spectra, readings.depth, readings.emergence):
        assert "$" not in reading(analysis, "tiny", "float32")


def test_generation_reads_every_steps_error_and_largest_stable_rank():
    from lllm import generate_with_jacobians, per_token_stable_rank

    model, tok = tiny_loader(SWEEP_MODEL, torch.float32)
    result = generate_with_jacobians(model, tok, PROMPT, n_tokens=2, progress=False)
    text = readings.generation(result, "tiny", "float32")
    worst = max(step.jacobian.relative_error for step in result.steps)
    rank = max(float(per_token_stable_rank(step.jacobian).max()) for step in result.steps)
    assert f"at most {worst:.1e}" in text and f"above {rank:.2f}" in text and "2 steps" in text


def test_across_models_counts_the_models_whose_u1_decodes_the_prediction(analysis):
    prediction = analysis.meta["next_tokens"][0]["token"]
    hit = copy.deepcopy(analysis.meta["token_decodings"])
    hit[-1][0]["u"]["tokens"] = [prediction]
    miss = copy.deepcopy(hit)
    miss[-1][0]["u"]["tokens"] = ["<none>"]
    analyses = {"a": with_meta(analysis, token_decodings=hit), "b": with_meta(analysis, token_decodings=miss)}
    text = readings.across_models(analyses, "float32")
    assert "on 1 of 2 models (a)" in text and f"{max(analysis.meta['token_stable_rank']):.2f}" in text


def test_steering_counts_the_prompts_the_concept_word_entered():
    from lllm.analyses.steering import lambda_sweep

    model, tok = tiny_loader(SWEEP_MODEL, torch.float32)
    sweep = lambda_sweep(model, tok, "3 9 27", "5 17 33", [1.0, 0.0], n_tokens=3)
    word = tok.decode(sweep[-1].steered_ids[:1]).strip() or "<none>"
    text = readings.steering({"5 17 33": sweep}, word, "tiny", "float32")
    entered = word.lower() in sweep[-1].steered_text.lower() and word.lower() not in sweep[-1].normal_text.lower()
    assert f"into the continuation of {int(entered)} of 1 prompts" in text
    assert "of 1 prompts" in readings.steering({"5 17 33": sweep}, "zzz-not-a-token", "tiny", "float32")
    assert "into the continuation of 0 of 1" in readings.steering({"5 17 33": sweep}, "zzz-not-a-token", "tiny",
                                                                  "float32")
