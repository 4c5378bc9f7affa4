"""The SVD with lllm's sign convention: the one decomposition that the kernel's matrix-free operator and the
analyses share (singular vectors are defined only up to a joint sign flip; `svd` fixes it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lllm.errors import ArgumentError, LLLMError
from lllm.validation import check_int, check_type


@dataclass(frozen=True)
class SVD:
    """A ≈ U diag(S) Vh for A: (m, n), top k triplets, signs fixed by the convention of `svd`."""

    U: torch.Tensor  # (m, k): left singular vectors as columns (output space of a Jacobian)
    S: torch.Tensor  # (k,): singular values, descending
    Vh: torch.Tensor  # (k, n): right singular vectors as rows (input space of a Jacobian)
    complete: bool  # S holds all min(m, n) singular values, so Σ S² = ‖A‖²_F

    @property
    def V(self) -> torch.Tensor:
        """(n, k): the right singular vectors as columns."""
        return self.Vh.mT

    @property
    def k(self) -> int:
        """Number of singular triplets held."""
        return self.S.shape[0]

    def matrix(self) -> torch.Tensor:
        """U diag(S) Vh: (m, n), A itself when complete, else its best rank-k approximation."""
        return (self.U * self.S) @ self.Vh


def svd(matrix: torch.Tensor, k: int | None = None, *, reference: torch.Tensor | None = None) -> SVD:
    """SVD of matrix: (m, n), all min(m, n) triplets or the top k, with deterministic signs.

    Sign convention (a pair (u, v) is defined only up to a joint flip, which leaves U diag(S) Vh
    unchanged): each pair is oriented so that u·reference > 0 when a reference vector (m,) is
    given (e.g. the output y, for a Jacobian whose left singular vectors live in output space);
    without a reference, or where u·reference is exactly 0, so that the entry of u with the
    largest |value| (the first such) is positive. Where singular values repeat, the vectors are
    not unique beyond sign and only their span is meaningful.

    The top k are the leading part of the exact thin SVD (torch.linalg.svd, full_matrices=False):
    no randomized method, so repeated calls give identical results.
    """
    check_type(matrix, torch.Tensor, "matrix")
    if matrix.ndim != 2:
        raise LLLMError(f"svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    return batched_svd(matrix[None], k, reference)[0]


def decomposable(matrix: torch.Tensor) -> torch.Tensor:
    """matrix in a dtype torch's SVD kernels take: float16 and bfloat16 are decomposed in float32."""
    return matrix.float() if matrix.dtype in (torch.float16, torch.bfloat16) else matrix


def batched_svd(blocks: torch.Tensor, k: int | None, reference: torch.Tensor | None) -> list[SVD]:
    """One oriented SVD per matrix of blocks: (B, m, n), all sharing the same reference (m,) or None."""
    blocks = decomposable(blocks)
    _, m, n = blocks.shape
    full = min(m, n)
    k = full if k is None else check_int(k, "k")
    if not 1 <= k <= full:
        raise ArgumentError(f"k must be between 1 and min(m, n) = {full}, got {k}")
    if reference is not None and reference.shape != (m,):
        raise LLLMError(f"the reference vector must have shape ({m},) to orient left singular vectors, got "
                        f"{tuple(reference.shape)}")
    if not torch.isfinite(blocks).all():
        raise LLLMError("the matrix has NaN or infinite entries; its SVD is undefined")
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)  # (B, m, r), (B, r), (B, r, n)
    U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    signs = orientation_signs(U, reference)  # (B, k)
    U, Vh = U * signs[:, None, :], Vh * signs[:, :, None]
    return [SVD(U=u, S=s, Vh=vh, complete=k == full) for u, s, vh in zip(U, S, Vh)]


def orientation_signs(U: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """±1 per column of U: (B, m, k) implementing the sign convention of `svd`: (B, k)."""
    biggest = U.abs().argmax(dim=-2, keepdim=True)  # (B, 1, k): first entry of largest |value|
    signs = torch.sign(U.gather(-2, biggest)[:, 0, :])  # never 0: a unit vector has a nonzero entry
    if reference is not None:
        dots = torch.einsum("bmk,m->bk", U, reference.to(U.dtype))
        signs = torch.where(dots != 0, torch.sign(dots), signs)
    return signs
