"""The leading eigenvector of a symmetric positive semi-definite matrix by Lanczos, for σ_max of a wide Jacobian.

A stable rank needs σ²_max of a (d, T·d) map alone: the top eigenpair of its (d, d) Gram matrix. LAPACK's syevr
reduces the whole matrix to tridiagonal form first (~7 ms for d = 576, 180 times per SmolLM2 analysis); Lanczos
needs a few dozen products with it (~0.1 ms each) where σ₁ stands clear of σ₂, as in these maps. Its answer is
accepted only when the residual ‖G y − θ y‖, recomputed in float64 from the matrix itself, is below `tol`·θ;
else the caller asks LAPACK.
"""

from __future__ import annotations

import numpy as np
import torch

TOL = 1e-9  # residual of the accepted pair, relative to θ: syevr's float32 vector carries ~1e-7
MAX_STEPS = 64  # beyond that, the gap is too small for Lanczos to pay: LAPACK decides
CHECK_EVERY = 4  # steps between convergence tests (each solves the small tridiagonal problem)


def leading_eigenvector(gram: torch.Tensor, tol: float = TOL, max_steps: int = MAX_STEPS) -> torch.Tensor | None:
    """The unit eigenvector (m,) float64 of the largest eigenvalue of a symmetric PSD matrix of which only the lower
    triangle need be filled (on the CPU); None where Lanczos has not converged to tol within max_steps, for m < 8,
    for a matrix holding NaN or inf, or on another device."""
    m = gram.shape[0]
    if gram.device.type != "cpu" or m < 2 * CHECK_EVERY:
        return None
    from scipy.linalg import blas, eigh_tridiagonal

    # float64 products: the residual test then sees the matrix, not rounding; column-major, as BLAS reads it (a
    # row-major array would be copied by every product)
    g = np.asfortranarray(gram.detach().to(torch.float64).numpy())
    product = lambda v: blas.dsymv(1.0, g, v, lower=1)  # noqa: E731  G v from the lower triangle alone
    steps = min(max_steps, m)
    basis = np.zeros((steps + 1, m))  # the Krylov basis q₀ … q_j as rows, kept orthonormal
    alphas, betas = np.zeros(steps), np.zeros(steps)
    start = np.random.default_rng(0).standard_normal(m)  # fixed: the same answer on every run
    basis[0] = start / np.linalg.norm(start)
    for j in range(steps):
        w = product(basis[j])
        if not np.isfinite(w).all():  # NaN or inf in the lower triangle reaches every product
            return None
        alphas[j] = basis[j] @ w
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough"): no ghost copies of θ
            w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
        betas[j] = np.linalg.norm(w)
        exhausted = betas[j] <= 1e-14 * max(abs(alphas[j]), 1e-300)  # an invariant subspace: exact
        if exhausted or (j + 1) % CHECK_EVERY == 0 or j + 1 == steps:
            theta, s = eigh_tridiagonal(alphas[:j + 1], betas[:j], select="i", select_range=(j, j))
            if theta[0] <= 0:
                return None  # a zero (or numerically indefinite) matrix: LAPACK's answer stands
            if exhausted or abs(betas[j] * s[-1, 0]) <= tol * theta[0]:  # the recurrence's residual estimate
                y = basis[:j + 1].T @ s[:, 0]
                y /= np.linalg.norm(y)
                if np.linalg.norm(product(y) - theta[0] * y) <= tol * theta[0]:  # and the true one
                    return torch.from_numpy(y)
        if exhausted:
            return None
        basis[j + 1] = w / betas[j]
    return None
