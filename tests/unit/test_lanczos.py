"""Lanczos's top left singular vector (lllm.kernel.lanczos): LAPACK's answer where it converges, None where it does
not, and the stable ranks built on it."""

import numpy as np
import pytest
import torch

from lllm.analyses import decompose as dec
from lllm.kernel.lanczos import leading_left_singular_vector


def wide_with_spectrum(singular_values, n: int = 400, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """U diag(s) Vᵀ (m, n) for random orthonormal U (m, m) and V (n, m)."""
    rng = np.random.default_rng(seed)
    m = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return torch.from_numpy((u * np.asarray(singular_values)) @ v.T).to(dtype)


def test_the_top_left_singular_vector_of_a_matrix_with_a_clear_gap():
    singular_values = np.concatenate([[10.0, 4.0], np.linspace(0, 2, 198)])
    for dtype, close in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        matrix = wide_with_spectrum(singular_values, dtype=dtype)
        u = leading_left_singular_vector(matrix)
        assert u is not None and u.dtype == torch.float64
        exact = torch.linalg.svd(matrix.double(), full_matrices=False)[0][:, 0]
        assert abs(float(u @ exact)) == pytest.approx(1.0, abs=close)
        assert float((matrix.double().mT @ u).square().sum()) == pytest.approx(100.0, rel=close)


def test_no_answer_where_lanczos_does_not_converge_or_the_matrix_is_zero_tiny_or_not_finite():
    crowded = wide_with_spectrum(np.sqrt(np.linspace(1.0, 1.001, 300)))  # no gap at the top: slow convergence
    assert leading_left_singular_vector(crowded, max_steps=8) is None
    assert leading_left_singular_vector(torch.zeros(50, 80, dtype=torch.float64)) is None
    assert leading_left_singular_vector(wide_with_spectrum([3.0, 1.0, 0.5])) is None  # m < 8: LAPACK's job
    assert leading_left_singular_vector(wide_with_spectrum(np.linspace(1, 5, 40)).half()) is None  # not float32/64
    for bad in (float("nan"), float("inf")):
        broken = wide_with_spectrum(np.linspace(0, 5, 40))
        broken[30, 2] = bad
        assert leading_left_singular_vector(broken) is None


def test_no_float32_answer_where_sigma_1_and_sigma_2_are_too_close_for_its_products():
    """σ₂ = (1 − 1e-6)·σ₁: a float32 residual cannot separate them, and the Rayleigh quotient's error could reach
    the gap; the quotient's error bound r²/gap refuses the pair, and LAPACK decides."""
    singular_values = np.concatenate([[10.0, 10.0 * (1 - 1e-6)], np.linspace(0, 2, 98)])
    matrix = wide_with_spectrum(singular_values, dtype=torch.float32)
    assert leading_left_singular_vector(matrix) is None
    expected = float(dec.stable_rank(torch.linalg.svdvals(matrix.double())))
    assert dec.stable_ranks_wide(matrix[None])[0] == pytest.approx(expected, rel=1e-6)


def test_a_rank_one_matrix_is_exact_once_its_krylov_space_is_exhausted():
    gen = torch.Generator().manual_seed(1)
    u, w = torch.randn(60, dtype=torch.float64, generator=gen), torch.randn(90, dtype=torch.float64, generator=gen)
    v = leading_left_singular_vector(torch.outer(u, w))  # an invariant subspace after two steps
    assert v is not None and abs(float(v @ u / u.norm())) == pytest.approx(1.0, abs=1e-12)


def test_stable_ranks_agree_with_lapacks_vector(monkeypatch):
    torch.manual_seed(0)
    matrices = torch.randn(3, 40, 300) * torch.linspace(0.1, 2.0, 300)
    matrices[:, :1] *= 5  # one row well above the rest: σ₁ stands clear
    assert all(leading_left_singular_vector(m) is not None for m in matrices)
    by_lanczos = dec.stable_ranks_wide(matrices)
    monkeypatch.setattr(dec, "leading_left_singular_vector", lambda matrix: None)  # LAPACK's syevr throughout
    by_lapack = dec.stable_ranks_wide(matrices)
    exact = [float(dec.stable_rank(torch.linalg.svdvals(m.double()))) for m in matrices]
    assert by_lanczos == pytest.approx(by_lapack, rel=1e-10) and by_lanczos == pytest.approx(exact, rel=1e-6)


def test_stable_ranks_where_lanczos_gives_up_come_from_lapack():
    """σ₁ ≈ σ₂ ≈ … : Lanczos is refused its answer within the steps allowed, LAPACK's vector gives the same rank."""
    crowded = wide_with_spectrum(np.sqrt(np.linspace(1.0, 1.001, 300)))[None]
    assert leading_left_singular_vector(crowded[0]) is None  # within MAX_STEPS
    expected = float(dec.stable_rank(torch.linalg.svdvals(crowded[0])))
    assert dec.stable_ranks_wide(crowded)[0] == pytest.approx(expected, rel=1e-12)
