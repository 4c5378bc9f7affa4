"""The benchmark compares like with like: the reference re-implementation computes lllm's numbers (the harness
runs in tests/e2e/test_benchmarks.py)."""

import pytest
import torch

import lllm
from lllm.kernel.jacobian import embed
from benchmarks.reference import COMPONENTS, full_jacobian, reference_analysis
from lllm.analyses.pipeline import analyze
from lllm.kernel.layers import cumulative_jacobians, layerwise_jacobians
from tiny import IdsTokenizer, tiny_model

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
    # lllm's layer spectra (the layer output's, the one a figure draws) come from a float64 Gram matrix: its tail
    # is accurate to ~1e-8·σ_max
    assert list(analysis.layer_spectra) == ["layer"]
    torch.testing.assert_close(analysis.layer_spectra["layer"], ref.layer_spectra["layer"], rtol=0,
                               atol=1e-7 * float(ref.layer_spectra["layer"].max()))
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
