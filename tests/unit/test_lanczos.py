"""Lanczos's leading eigenvector (lllm.kernel.lanczos): LAPACK's answer where it converges, None where it does not."""

import numpy as np
import pytest
import torch

from lllm.analyses import decompose as dec
from lllm.kernel.lanczos import leading_eigenvector


def gram_with_spectrum(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q, in float64."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return torch.from_numpy((q * np.asarray(eigenvalues)) @ q.T)


def test_the_leading_eigenvector_of_a_matrix_with_a_clear_gap_reading_its_lower_triangle_alone():
    eigenvalues = np.concatenate([[10.0, 4.0], np.linspace(0, 2, 198)])
    gram = gram_with_spectrum(eigenvalues)
    lower = torch.tril(gram) + torch.triu(torch.full_like(gram, float("nan")), 1)  # the upper triangle unread
    v = leading_eigenvector(lower)
    assert v is not None and v.dtype == torch.float64
    exact = torch.linalg.eigh(gram)[1][:, -1]
    assert abs(float(v @ exact)) == pytest.approx(1.0, abs=1e-12)
    assert float(v @ gram @ v) == pytest.approx(10.0, rel=1e-12)


def test_no_answer_where_lanczos_does_not_converge_or_the_matrix_is_zero_tiny_or_not_finite():
    crowded = gram_with_spectrum(np.linspace(1.0, 1.001, 300))  # no gap at the top: slow convergence
    assert leading_eigenvector(crowded, max_steps=8) is None
    assert leading_eigenvector(torch.zeros(50, 50, dtype=torch.float64)) is None
    assert leading_eigenvector(gram_with_spectrum([3.0, 1.0, 0.5])) is None  # m < 8: LAPACK's job
    broken = gram_with_spectrum(np.linspace(0, 5, 40))
    broken[30, 2] = float("nan")  # lower triangle
    assert leading_eigenvector(broken) is None


def test_a_rank_one_matrix_and_a_row_major_float32_one():
    u = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = leading_eigenvector(torch.outer(u, u))  # an invariant subspace after one step: exact
    assert v is not None and abs(float(v @ u / u.norm())) == pytest.approx(1.0, abs=1e-12)
    gram = gram_with_spectrum(np.concatenate([[9.0], np.linspace(0, 3, 99)])).float().contiguous()
    v = leading_eigenvector(gram)
    assert v is not None and float(v @ gram.double() @ v) == pytest.approx(9.0, rel=1e-6)


def test_stable_ranks_agree_with_lapacks_vector(monkeypatch):
    torch.manual_seed(0)
    matrices = torch.randn(3, 40, 300) * torch.linspace(0.1, 2.0, 300)
    matrices[:, :2] *= 5  # two rows well above the rest: σ₁ stands clear
    assert all(leading_eigenvector(dec._gram(m, "test", torch.float32)) is not None for m in matrices)
    lanczos = dec.stable_ranks_wide(matrices)
    monkeypatch.setattr(dec, "leading_eigenvector", lambda gram: None)  # LAPACK's syevr throughout
    lapack = dec.stable_ranks_wide(matrices)
    exact = [float(dec.stable_rank(torch.linalg.svdvals(m.double()))) for m in matrices]
    assert lanczos == pytest.approx(lapack, rel=1e-10) and lanczos == pytest.approx(exact, rel=1e-6)
