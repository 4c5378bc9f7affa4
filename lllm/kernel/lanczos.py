"""The top left singular vector of a wide matrix by Lanczos on M Mᵀ, for σ_max of a wide Jacobian.

A stable rank needs σ²_max of a (d, T·d) map alone: the top eigenpair of M Mᵀ. Forming that Gram matrix costs
d²·T·d products (~16 ms for SmolLM2's (576, 4032) maps on one core, 180 times per analysis) and LAPACK's syevr
then reduces it to tridiagonal form. Lanczos needs only products v ↦ M (Mᵀ v), two matrix-vector products that read
M once each (~0.4 ms), and converges in about a dozen steps where σ₁ stands clear of σ₂, as in these maps. Its
answer is accepted only when the residual r = ‖M Mᵀ y − θ y‖, recomputed from the matrix itself, is below
`ACCEPT`·tol·θ, and the Rayleigh quotient's error that r implies, about r²/(θ₁ − θ₂) with θ₂ the next Ritz value
(Kato–Temple, the gap estimated from below λ₂), is below `ERROR`·θ; else the caller asks LAPACK. The products are
not rescaled: matrices whose entries are near float32's range limits (~1e-19 or ~1e19) fail over to LAPACK or,
where they underflow, lose accuracy as the Gram matrix would.
"""

from __future__ import annotations

import numpy as np
import torch

# the recurrence's residual estimate at which a pair is taken, relative to θ, by the matrix's precision: float32
# products carry ~1e-7 of rounding, so 1e-6 is as close as their residual can come
TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
ACCEPT = 10  # the true residual, recomputed, may exceed the estimate by this factor (the products' rounding)
ERROR = {torch.float32: 1e-9, torch.float64: 1e-14}  # the Rayleigh quotient's relative error r²/gap allowed
MAX_STEPS = 64  # beyond that, the gap is too small for Lanczos to pay: LAPACK decides
CHECK_EVERY = 4  # steps between convergence tests (each solves the small tridiagonal problem)


def leading_left_singular_vector(matrix: torch.Tensor, max_steps: int = MAX_STEPS) -> torch.Tensor | None:
    """The unit vector u (m,) float64 of the largest singular value of a wide float32 or float64 matrix (m, n ≥ m),
    by Lanczos on M Mᵀ with products in the matrix's precision; None where Lanczos has not converged within
    max_steps, for m < 8, another dtype, a zero matrix, or one holding NaN or inf (or whose products overflow)."""
    m = matrix.shape[0]
    if matrix.dtype not in TOL or m < 2 * CHECK_EVERY:
        return None
    from scipy.linalg import eigh_tridiagonal

    def product(v: np.ndarray) -> np.ndarray:  # M (Mᵀ v): (m,) float64 out, the products in M's precision
        u = torch.from_numpy(v).to(device=matrix.device, dtype=matrix.dtype)
        return (matrix @ (matrix.mT @ u)).to(torch.float64).cpu().numpy()

    tol = TOL[matrix.dtype]
    steps = min(max_steps, m)
    basis = np.zeros((steps + 1, m))  # the Krylov basis q₀ … q_j as rows, kept orthonormal
    alphas, betas = np.zeros(steps), np.zeros(steps)
    start = np.random.default_rng(0).standard_normal(m)  # fixed: the same answer on every run
    basis[0] = start / np.linalg.norm(start)
    for j in range(steps):
        w = product(basis[j])
        if not np.isfinite(w).all():  # NaN or inf in M reaches every product
            return None
        alphas[j] = basis[j] @ w
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough"): no ghost copies of θ
            w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
        betas[j] = np.linalg.norm(w)
        exhausted = betas[j] <= 1e-14 * max(abs(alphas[j]), 1e-300)  # an invariant subspace: exact
        if exhausted or (j + 1) % CHECK_EVERY == 0 or j + 1 == steps:
            thetas, s = eigh_tridiagonal(alphas[:j + 1], betas[:j], select="i", select_range=(max(j - 1, 0), j))
            theta, below = thetas[-1], thetas[0] if j else 0.0  # the top two Ritz values (ascending)
            if theta <= 0:
                return None  # a zero (or numerically indefinite) matrix: LAPACK's answer stands
            if exhausted or abs(betas[j] * s[-1, -1]) <= tol * theta:  # the recurrence's residual estimate
                y = basis[:j + 1].T @ s[:, -1]
                y /= np.linalg.norm(y)
                residual = np.linalg.norm(product(y) - theta * y)  # and the true one
                if residual <= ACCEPT * tol * theta and residual ** 2 <= ERROR[matrix.dtype] * theta * (theta - below):
                    return torch.from_numpy(y)  # else more steps, and in the end LAPACK
        if exhausted:
            return None
        basis[j + 1] = w / betas[j]
    return None
