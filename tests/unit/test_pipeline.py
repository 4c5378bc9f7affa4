"""One per-prompt pipeline: `analyze` (lllm analyze, the notebooks), `prompt_row` (lllm sweep) and the cached path
give the same numbers for the same prompt, computed by the same functions; the cheap stable rank agrees with the
full spectrum's."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import SWEEP_MODEL, tiny_loader
from tiny import tiny_sweep as sweep

from lllm.analyses import decompose as dec
from lllm.analyses.pipeline import analyze, cached_analyze, prompt_row
from lllm.apps.cli import main as lllm_main
from lllm.io.store import ResultCache

PROMPT = "5 17 33 8 61 2 40"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The sweep computes with one torch thread per process; so do these comparisons (thread counts change the
    order of float reductions, hence the last bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return tiny_loader(SWEEP_MODEL, torch.float64)


@pytest.fixture(scope="module")
def analysis(tiny):
    return analyze(*tiny, PROMPT, progress=False)


def test_analyze_and_the_sweep_row_give_identical_numbers(tiny, analysis, tmp_path):
    row = prompt_row(*tiny, PROMPT)
    meta = analysis.meta
    assert row["token_ids"] == meta["token_ids"] and row["tokens"] == meta["tokens"]
    assert row["next_token_ids"] == [t["id"] for t in meta["next_tokens"]]
    assert row["next_probs"] == [t["prob"] for t in meta["next_tokens"]]
    assert row["reconstruction_error"] == meta["relative_error"]
    assert row["token_stable_ranks"] == meta["token_stable_rank"]
    for comp, ranks in analysis.stable_ranks("cumulative").items():
        assert row[f"cumulative_stable_rank_{comp}"] == ranks
    # the sweep writes the row through Parquet unchanged (float64 columns)
    written = sweep(tmp_path / "s.parquet", [PROMPT]).iloc[0]
    assert list(written["cumulative_stable_rank_layer"]) == row["cumulative_stable_rank_layer"]
    assert written["reconstruction_error"] == row["reconstruction_error"]


def test_the_cached_analysis_is_the_analysis(tiny, analysis, tmp_path):
    cache = ResultCache(tmp_path / "cache")
    first = cached_analyze(*tiny, PROMPT, cache=cache, progress=False)
    again = cached_analyze(*tiny, PROMPT, cache=cache, progress=False)
    for got in (first, again):
        assert got.stable_ranks("cumulative") == analysis.stable_ranks("cumulative")
        assert got.stable_ranks("layerwise") == analysis.stable_ranks("layerwise")
        assert got.meta["relative_error"] == analysis.meta["relative_error"]
        assert torch.equal(got.final.jacobian, analysis.final.jacobian)
    assert len(list((tmp_path / "cache" / "analysis").iterdir())) == 1  # one entry, computed once


def test_lllm_analyze_writes_the_same_numbers(analysis, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lllm.load", lambda name, dtype, device: tiny_loader(name, dtype), raising=False)
    monkeypatch.setenv("LLLM_CACHE_DIR", str(tmp_path / "cache"))
    assert lllm_main(["analyze", "--model", SWEEP_MODEL, "--prompt", PROMPT, "--dtype", "float64",
                      "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "analysis-summary.json").read_text())
    assert summary["stable_rank"] == analysis.stable_ranks("cumulative")
    assert summary["relative_error"] == analysis.meta["relative_error"]
    assert summary["token_stable_rank"] == analysis.meta["token_stable_rank"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_stable_rank_from_frobenius_and_sigma_max_agrees_with_the_full_spectrum(tiny, dtype, tolerance):
    model, tok = tiny_loader(SWEEP_MODEL, dtype)
    layers = analyze(model, tok, PROMPT, components=("layer",), progress=False)
    for ell, matrix in enumerate(layers.final.combined[None]):
        full = dec.stable_rank(torch.linalg.svdvals(matrix.double()))
        assert dec.stable_ranks_wide(matrix[None])[0] == pytest.approx(full, rel=tolerance)
    spectra = layers.layer_spectra["layer"]  # (L, d): the full spectra the figures plot
    for cheap, spectrum in zip(layers.stable_ranks("cumulative")["layer"], spectra):
        assert cheap == pytest.approx(dec.stable_rank(spectrum.double()), rel=tolerance)


def test_stable_rank_of_a_known_matrix():
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    wide = torch.cat([matrix, torch.zeros(3, 4, dtype=torch.float64)], dim=1)  # (3, 7)
    assert dec.stable_ranks_wide(wide[None]) == [pytest.approx((9 + 4 + 1) / 9, rel=1e-15)]


def test_a_memory_budget_reduces_layer_groups_to_the_same_numbers(tiny, analysis):
    """With a budget that holds two layers' Jacobians, the analysis runs in groups and keeps only reductions:
    the numbers are those of the one-group run (the default budget holds every layer of a tiny model)."""
    model, tok = tiny
    n_layers, d, T = model.config.num_hidden_layers, model.config.hidden_size, len(analysis.meta["token_ids"])
    one_layer = 2 * 3 * d * d * T * 8  # two kinds, three components, float64
    assert analysis.meta["layer_groups"] == [list(range(n_layers))]
    grouped = analyze(model, tok, PROMPT, progress=False, memory_budget=one_layer)
    assert grouped.meta["layer_groups"] == [[ell] for ell in range(n_layers)]
    for kind in ("cumulative", "layerwise"):
        for comp, ranks in analysis.stable_ranks(kind).items():
            assert grouped.stable_ranks(kind)[comp] == pytest.approx(ranks, rel=1e-12)
    for comp in analysis.layer_spectra:
        torch.testing.assert_close(grouped.layer_spectra[comp], analysis.layer_spectra[comp], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grouped.layer_top_u[comp], analysis.layer_top_u[comp], rtol=1e-10, atol=1e-12)
    assert grouped.meta["layer_decodings"] == analysis.meta["layer_decodings"]
    torch.testing.assert_close(grouped.final.jacobian, analysis.final.jacobian, rtol=0, atol=0)


def test_layer_decodings_carry_the_right_singular_vectors_of_each_layer(tiny, analysis):
    """Tables 1–3's Input column: each layer's top right singular vector, from a direct SVD of its cumulative J⁺,
    decoded at the token where it weighs most."""
    from lllm.kernel.layers import cumulative_jacobians

    model, tok = tiny
    ell = analysis.layers[-2]
    jacobians = cumulative_jacobians(model, tok, analysis.meta["token_ids"], layers=[ell], components=["layer"],
                                     progress=False)
    full = dec.svd(jacobians.combined("layer", ell), 3, reference=analysis.final.output)
    d, T = model.config.hidden_size, len(analysis.meta["token_ids"])
    entries = analysis.meta["layer_decodings"][analysis.layers.index(ell)]
    for j, entry in enumerate(entries):
        v = full.Vh[j].reshape(T, d)
        shares = v.square().sum(dim=-1)
        where = int(shares.argmax())
        assert entry["v"]["token"] == where
        assert entry["v"]["share"] == pytest.approx(float(shares[where] / shares.sum()), rel=1e-9)
        assert entry["v"]["ids"] == dec.decode_input(v[where], model, tok, len(entry["v"]["ids"])).ids
