"""The benchmark compares like with like: the reference re-implementation computes lllm's numbers; the harness runs."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lllm
from lllm.kernel.jacobian import embed
from benchmarks import harness
from benchmarks.reference import COMPONENTS, full_jacobian, reference_analysis
from lllm.analyses.pipeline import analyze
from lllm.kernel.layers import cumulative_jacobians, layerwise_jacobians
from tiny import IdsTokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TOK = IdsTokenizer()
PROMPT = "5 17 33 8 90 41 3"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "phi3", "olmo2"])
def test_reference_computes_what_lllm_computes(family):
    model = tiny_model(family, torch.float64)
    ref = reference_analysis(model, TOK, PROMPT)
    analysis = analyze(model, TOK, PROMPT, progress=False)
    cumulative = cumulative_jacobians(model, TOK, PROMPT, progress=False)
    layerwise = layerwise_jacobians(model, TOK, PROMPT, progress=False)
    assert relative(ref.final, analysis.final.jacobian) <= 1e-10
    assert relative(ref.ordinary, lllm.ordinary_jacobian(model, TOK, PROMPT, progress=False).jacobian) <= 1e-10
    assert relative(ref.ordinary, ref.final) > 1e-3  # the ordinary J really is a different matrix
    for c in COMPONENTS:
        assert ref.cumulative[c].shape == cumulative.jacobian[c].shape == (2, 32, 7, 32)
        assert relative(ref.cumulative[c], cumulative.jacobian[c]) <= 1e-10
        assert relative(ref.layerwise[c], layerwise.jacobian[c]) <= 1e-10
        # lllm's layer spectra come from a float64 Gram matrix: its tail is accurate to ~1e-8·σ_max
        torch.testing.assert_close(analysis.layer_spectra[c], ref.layer_spectra[c], rtol=0,
                                   atol=1e-7 * float(ref.layer_spectra[c].max()))
    torch.testing.assert_close(analysis.token_spectra, ref.token_spectra, rtol=1e-10, atol=1e-12)
    for kind in ("cumulative", "layerwise"):
        for c in COMPONENTS:
            torch.testing.assert_close(torch.tensor(analysis.stable_ranks(kind)[c]),
                                       torch.tensor(ref.stable_ranks(kind)[c]), rtol=1e-10, atol=0)


def test_reference_detached_jacobian_reconstructs_the_output():
    model = tiny_model("llama", torch.float64)
    x = embed(model, TOK(PROMPT)["input_ids"])
    jac = full_jacobian(model, x)
    with torch.no_grad(), lllm.detached(model):  # in float64 the detached forward skips transformers' float32 norm
        y = lllm.kernel.jacobian.final_hidden(model, x)
    assert lllm.relative_error(y, torch.einsum("otd,td->o", jac, x)) <= 1e-12


def test_a_worker_past_the_memory_cap_is_killed_and_reported():
    config = dataclasses.replace(harness.QUICK, memory_cap=1e-6)  # a few kB: exceeded at the first poll
    job = {"model": "tiny-llama", "method": "lllm_full", "tokens": 8, "options": {}}
    assert harness.in_subprocess(job, config)["failed"].startswith("killed at")


def test_harness_runs_end_to_end_in_quick_mode(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/harness.py", "--quick", "--model", "tiny-llama",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    results = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "## (d)", "load average (1/5/15 min)"):
        assert heading in results
    assert "within the 1e-5 float32 criterion" in results
    assert "within the 1e-4 criterion" in results
    assert (tmp_path / "time_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
