"""Decompositions and token decodings of detached Jacobians: the numbers behind paper Figs 4–6, Tables 1–3.

- `token_svds`, `combined_svd`: SVDs of the blocks J⁺ᵢ and of [J⁺₀ … J⁺_T], with the sign convention of
  `lllm.kernel.svd.svd` (singular vectors are defined only up to sign); `left_spectrum` from the Gram matrix.
- `stable_rank`, `per_token_stable_rank`: R = Σ S² / S²_max (paper §3.6); `stable_ranks_wide` from ‖J‖²_F
  and σ_max alone.
- `decode_output`: output-space vector → tokens through lm_head (logit lens; optionally the final
  norm first, for residual-stream vectors of intermediate layers).
- `decode_input`: input-space vector → tokens by cosine nearest neighbour among input embeddings.
- `row_col_features` (Fig 4A), `decode_svd` (Fig 4B, 5, Tables 1–3), `projection_onto` (Fig 6B).

In a Jacobian block J⁺ᵢ (d_out, d_in), row r = ∂y_r/∂xᵢ and the right singular vectors live in
input space; column c = ∂y/∂xᵢ,c and the left singular vectors live in output space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from lllm.errors import ArgumentError, LLLMError, UnsupportedModelError
from lllm.kernel.jacobian import JacobianResult
from lllm.kernel.lanczos import leading_left_singular_vector
from lllm.kernel.svd import SVD, batched_svd, decomposable, orientation_signs, svd
from lllm.validation import check_int, check_type

SIGNS = ("positive", "both")  # decode vec only, or vec and -vec


# ---------------------------------------------------------------------------------------------
# Spectra and stable rank (the SVD itself, with its sign convention, is lllm.kernel.svd)
# ---------------------------------------------------------------------------------------------


def _gram(matrix: torch.Tensor, what: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Gram matrix A Aᵀ (m, m) of a wide matrix A (m, n ≥ m), in `dtype` (float64 or float32), for the
    eigensolvers below, which read its lower triangle: on the CPU only that one is filled.

    On the CPU by BLAS's syrk, which computes one triangle (half the products of A @ Aᵀ, for which torch has no
    call): a (896, 6272) layer Jacobian of Qwen2.5-0.5B takes 0.06 s against torch's 0.28 s, on one thread.
    """
    if matrix.ndim != 2 or matrix.shape[0] > matrix.shape[1]:
        raise LLLMError(f"{what} needs a wide 2-D matrix (m ≤ n), got shape {tuple(matrix.shape)}")
    wide = matrix.detach().to(dtype)
    if wide.device.type != "cpu":
        gram = wide @ wide.mT
    else:
        from scipy.linalg import blas

        syrk = blas.dsyrk if dtype == torch.float64 else blas.ssyrk
        rows = wide.numpy()  # (m, n) row-major: the column-major (n, m) Aᵀ that BLAS reads without a copy
        gram = torch.from_numpy(syrk(1.0, rows.T, trans=1, lower=1))  # (Aᵀ)ᵀ Aᵀ = A Aᵀ, its lower triangle
    # the diagonal Σⱼ Aᵢⱼ² is NaN or inf exactly where row i holds one (or its squares overflow `dtype`): an
    # (m,) check in place of one over all m·n entries
    if not bool(torch.isfinite(gram.diagonal()).all()):
        if not bool(torch.isfinite(matrix.detach()).all()):
            raise LLLMError(f"{what}: the matrix holds NaN or inf; it has no singular values")
        raise LLLMError(f"{what}: the squares of the matrix's entries overflow {dtype}; it has no singular values "
                        "in that precision")
    return gram


def _eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """The ascending eigenvalues of a symmetric float64 matrix (LAPACK's syevd through SciPy on the CPU: 2.4×
    torch's time for an (896, 896) Gram matrix here)."""
    if gram.device.type != "cpu":
        return torch.linalg.eigvalsh(gram)
    from scipy.linalg import eigh

    return torch.from_numpy(eigh(gram.numpy(), lower=True, eigvals_only=True, driver="evd", check_finite=False))


def _top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    """(m, k): the eigenvectors of the k largest eigenvalues, largest first (on the CPU LAPACK's syevr, which
    computes those k alone: a sixth of a full eigh's time for k = 3 of 896)."""
    m = gram.shape[0]
    if gram.device.type != "cpu":
        return torch.linalg.eigh(gram)[1][:, m - k:].flip(1)
    from scipy.linalg import eigh

    _, vectors = eigh(gram.numpy(), lower=True, subset_by_index=[m - k, m - 1], driver="evr", check_finite=False)
    return torch.from_numpy(vectors[:, ::-1].copy())  # a copy: positive strides, also for k = 1


def _left_from_gram(gram: torch.Tensor, k: int, reference: torch.Tensor | None, dtype: torch.dtype,
                    eigenvalues: torch.Tensor):
    """(S (m,), U (m, k)) from a Gram matrix and its ascending `_eigenvalues`, signs by the convention of `svd`."""
    if not 1 <= k <= gram.shape[0]:
        raise ArgumentError(f"k must be between 1 and {gram.shape[0]}, got {k}")
    S = _singular_values(eigenvalues, dtype)
    U = _top_eigenvectors(gram, k).to(dtype)
    return S, U * orientation_signs(U[None], reference)[0]


def _singular_values(eigenvalues: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Singular values, largest first, from the ascending eigenvalues of a Gram matrix."""
    return eigenvalues.flip(0).clamp_min(0).sqrt().to(dtype)


def left_spectrum(matrix: torch.Tensor, k: int, *,
                  reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (m,), U (m, k)): all singular values and the top-k left singular vectors of a wide matrix (m, n ≥ m).

    Computed from the eigendecomposition of the Gram matrix A Aᵀ in float64 (m × m), several times
    faster than an SVD of the whole (m, n) matrix when n ≫ m, as for token-combined layer Jacobians
    (d × T·d). Squaring costs precision only in the tail: σᵢ is accurate to about 1e-8·σ_max, enough
    for spectra, stable ranks and the leading vectors. Signs follow the convention of `svd`.
    """
    gram = _gram(matrix, "left_spectrum")
    return _left_from_gram(gram, k, reference, matrix.dtype, _eigenvalues(gram))


def singular_values_wide(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values (m,) of a wide matrix (m, n ≥ m), from the float64 Gram eigenvalues (see left_spectrum)."""
    return _singular_values(_eigenvalues(_gram(matrix, "singular_values_wide")), matrix.dtype)


def stable_ranks_wide(matrices: torch.Tensor) -> list[float]:
    """R = ‖M‖²_F / σ²_max of every wide matrix M of matrices: (L, m, n ≥ m), without a spectrum.

    ‖M‖²_F is a float64 sum of squares. σ²_max is the Rayleigh quotient ‖Mᵀv‖² (float64) of v, the top left singular
    vector found by Lanczos on M Mᵀ with products in M's own precision (`lllm.kernel.lanczos`: no Gram matrix, about
    a dozen matrix-vector products), else the top eigenvector of the Gram matrix by LAPACK. A Rayleigh quotient falls
    short of σ²_max by Σⱼ (σ²_max − σ²ⱼ)·cⱼ², cⱼ v's components on the other singular vectors: v's error enters
    squared, about 1e-12 relative where σ₁ stands clear of σ₂ (SmolLM2's 180 maps: ≤ 2e-12 from LAPACK's); where it
    does not, Lanczos's estimate r²/gap of that error must stay below 1e-9 (float32), else LAPACK decides.
    """
    if matrices.ndim != 3 or matrices.shape[1] > matrices.shape[2]:
        raise LLLMError(f"stable_ranks_wide needs wide matrices (L, m, n ≥ m), got shape {tuple(matrices.shape)}")
    precision = matrices.dtype if matrices.dtype in (torch.float32, torch.float64) else torch.float64
    ranks = []
    for matrix in matrices:
        top = leading_left_singular_vector(matrix.detach())
        if top is None:  # Lanczos did not converge, or the matrix is small, zero, not finite or overflows: LAPACK
            gram = _gram(matrix, "stable_ranks_wide", precision)  # refuses NaN, inf and overflow
            top = _top_eigenvectors(gram, 1)[:, 0].to(torch.float64)
        product, squares = _float64_product(matrix.detach().mT, top.to(matrix.device) / top.norm())
        largest = float(product.square().sum())  # σ²_max, from below
        if largest <= 0:
            raise LLLMError("the stable rank of a zero matrix is undefined (its largest singular value is 0)")
        ranks.append(squares / largest)
    return ranks


def _float64_product(matrix: torch.Tensor, vector: torch.Tensor, columns: int = 128) -> tuple[torch.Tensor, float]:
    """(matrix (n, m) @ vector (m,), ‖matrix‖²_F), both in float64, the matrix cast a block of columns at a time (a
    float64 copy of the whole matrix would cost more than the product); the squares are summed from the same
    float64 block while it is in cache (a separate float64 norm read the matrix again: 2.5× the time)."""
    out = torch.zeros(matrix.shape[0], dtype=torch.float64, device=matrix.device)
    squares = torch.zeros((), dtype=torch.float64, device=matrix.device)
    for i in range(0, matrix.shape[1], columns):
        block = matrix[:, i:i + columns].to(torch.float64)  # (n, c)
        out += block @ vector[i:i + columns]
        flat = block.mT.reshape(-1) if block.mT.is_contiguous() else block.reshape(-1)  # a view of a dense block
        squares += torch.linalg.vecdot(flat, flat)
    return out, float(squares)


def token_svds(result: JacobianResult, k: int | None = None) -> list[SVD]:
    """SVD of every block J⁺ᵢ: (d_out, d_in), i = 0..T-1, oriented by the output y (reference)."""
    check_type(result, JacobianResult, "result", "pass what lllm.detached_jacobian returned")
    blocks = result.jacobian.permute(1, 0, 2)  # (T, d_out, d_in)
    return batched_svd(blocks, k, result.output)


def combined_svd(result: JacobianResult, k: int | None = None) -> SVD:
    """SVD of the token-combined matrix [J⁺₀ … J⁺_T]: (d_out, T·d_in), oriented by y."""
    check_type(result, JacobianResult, "result", "pass what lllm.detached_jacobian returned")
    return svd(result.combined, k, reference=result.output)


def split_right_vectors(decomposition: SVD, n_tokens: int) -> torch.Tensor:
    """The right singular vectors of a token-combined SVD, split per token: (k, T, d_in)."""
    k, width = decomposition.Vh.shape
    if n_tokens < 1 or width % n_tokens:
        raise LLLMError(f"right singular vectors of width {width} do not split into {n_tokens} tokens")
    return decomposition.Vh.reshape(k, n_tokens, width // n_tokens)


def stable_rank(spectrum_or_matrix: torch.Tensor | SVD) -> float:
    """R = Σ S² / S²_max of a complete spectrum S: (r,), a matrix: (m, n), or a complete SVD."""
    if isinstance(spectrum_or_matrix, SVD):
        if not spectrum_or_matrix.complete:
            raise LLLMError("the stable rank needs every singular value; this SVD holds only the top "
                            f"{spectrum_or_matrix.k}. Compute it with k=None or pass the matrix itself.")
        spectrum = spectrum_or_matrix.S
    elif spectrum_or_matrix.ndim == 2:
        spectrum = torch.linalg.svdvals(decomposable(spectrum_or_matrix))
    elif spectrum_or_matrix.ndim == 1:
        spectrum = spectrum_or_matrix
    else:
        raise LLLMError(f"stable_rank takes singular values (r,) or a matrix (m, n), got shape "
                        f"{tuple(spectrum_or_matrix.shape)}")
    return float(_stable_rank(spectrum))


def per_token_stable_rank(result: JacobianResult) -> torch.Tensor:
    """R of every block J⁺ᵢ: (T,)."""
    return _stable_rank(torch.linalg.svdvals(decomposable(result.jacobian.permute(1, 0, 2))))


def _stable_rank(spectrum: torch.Tensor) -> torch.Tensor:
    """Σ S² / S²_max along the last axis of spectrum: (..., r) -> (...)."""
    largest = spectrum.abs().amax(dim=-1)
    if (largest == 0).any():
        raise LLLMError("the stable rank of a zero matrix is undefined (its largest singular value is 0)")
    return spectrum.pow(2).sum(dim=-1) / largest.pow(2)


# ---------------------------------------------------------------------------------------------
# Decoding vectors to tokens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """The top-k tokens of one vector, best first, with their scores (logits or cosines)."""

    ids: list[int]
    tokens: list[str]
    scores: list[float]
    negative: Decoded | None = None  # the decoding of -vec, when signs="both"

    def __repr__(self) -> str:
        text = ", ".join(f"{token!r} {score:.3g}" for token, score in zip(self.tokens, self.scores))
        if self.negative is not None:
            text += " | −: " + ", ".join(repr(token) for token in self.negative.tokens)
        return f"Decoded({text})"

    def to_dict(self) -> dict:
        """A JSON-serializable dict: ids, tokens, scores (and negative)."""
        out = {"ids": self.ids, "tokens": self.tokens, "scores": self.scores}
        if self.negative is not None:
            out["negative"] = self.negative.to_dict()
        return out


def decode_output(
    vec: torch.Tensor, model: nn.Module, tokenizer, k: int = 5, *, through_norm: bool = False,
    signs: str = "positive",
) -> Decoded | list[Decoded]:
    """Top-k tokens of output-space vec: (d,) -> Decoded, or (n, d) -> list, by lm_head logits.

    through_norm applies the model's final norm first (logit lens on residual-stream vectors of
    intermediate layers); y and the Jacobian's columns and U are already after it. Scores are
    the logits before any final soft-capping: Gemma's final_logit_softcapping, cap·tanh(z/cap),
    is monotone, so it cannot change the ranking, and it is not applied.
    """
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embedding (lm_head) to decode with")
    norm = _final_norm(model) if through_norm else None

    def logits(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return lm_head(rows if norm is None else norm(rows))  # one (n, V) matmul, even for 262k tokens

    return _decode(vec, lm_head.weight, logits, tokenizer, k, signs)


def decode_input(
    vec: torch.Tensor, model: nn.Module, tokenizer, k: int = 5, *, signs: str = "positive",
) -> Decoded | list[Decoded]:
    """Top-k tokens of input-space vec: (d,) -> Decoded, or (n, d) -> list, by cosine with input embeddings."""
    weight = model.get_input_embeddings().weight  # (V, d)
    # x = weight · embed_scale for Gemma (√d) and x = weight elsewhere; cosine is scale-invariant,
    # so the raw rows give the same ranking and scores without copying a (V, d) matrix.
    # Zero rows (some models zero their padding embedding) get cosine 0 rather than NaN.
    row_norms = torch.linalg.vector_norm(weight.detach(), dim=1).clamp_min(torch.finfo(weight.dtype).tiny)

    def cosines(rows: torch.Tensor) -> torch.Tensor:
        lengths = torch.linalg.vector_norm(rows, dim=1, keepdim=True)  # (n, 1)
        if (lengths == 0).any():
            raise LLLMError("cannot decode a zero vector: it has no direction")
        with torch.no_grad():
            return (rows @ weight.T) / row_norms / lengths  # (n, V)

    return _decode(vec, weight, cosines, tokenizer, k, signs)


def _decode(
    vec: torch.Tensor, weight: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], tokenizer, k: int,
    signs: str,
) -> Decoded | list[Decoded]:
    """Shared decoding: score every token for each row of vec (and of -vec), keep the top k, in order."""
    vocab, d = weight.shape
    check_type(vec, torch.Tensor, "the vector to decode")
    k = check_int(k, "k")
    if signs not in SIGNS:
        raise ArgumentError(f"signs must be one of {SIGNS}, got {signs!r}")
    if not 1 <= k <= vocab:
        raise ArgumentError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if vec.ndim not in (1, 2) or vec.shape[-1] != d:
        raise LLLMError(f"expected a vector (d,) or vectors (n, d) with d = {d}, got shape {tuple(vec.shape)}")
    rows = vec.detach().reshape(-1, d).to(device=weight.device, dtype=weight.dtype)  # (n, d)
    n = rows.shape[0]
    batch = torch.cat([rows, -rows]) if signs == "both" else rows
    # topk over the full score vector is sorted at every rank, not only the first
    top = torch.topk(score(batch), k, dim=-1)
    decoded = [
        Decoded(ids=ids, tokens=[tokenizer.decode([i]) for i in ids], scores=values)
        for ids, values in zip(top.indices.tolist(), top.values.tolist())
    ]
    if signs == "both":
        decoded = [replace(pos, negative=neg) for pos, neg in zip(decoded[:n], decoded[n:])]
    return decoded[0] if vec.ndim == 1 else decoded


def _final_norm(model: nn.Module) -> nn.Module:
    """The model's final norm, refused inside lllm.detached(), where a replaying context applies recorded factors."""
    if getattr(model, "_lllm_detached", False):
        # a replaying detached context would apply a frozen rsqrt from another input
        raise UnsupportedModelError("decode with through_norm=True outside lllm.detached(): the final norm must "
                                    "compute its own factor, not a recorded one")
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no final norm at get_decoder().norm")
    return norm


# ---------------------------------------------------------------------------------------------
# Figure helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class RowColFeatures:
    """Fig 4A for one J⁺ᵢ: its largest-norm rows decoded to input tokens and columns to output tokens."""

    row_norms: torch.Tensor  # (d_out,): ‖J⁺ᵢ[r, :]‖, the magnitude distribution over output units
    col_norms: torch.Tensor  # (d_in,): ‖J⁺ᵢ[:, c]‖, over input dimensions
    rows: list[int]  # indices of the largest rows, largest first
    row_tokens: list[Decoded]  # row r = ∂y_r/∂xᵢ lives in input space: cosine nearest neighbour
    cols: list[int]  # indices of the largest columns, largest first
    col_tokens: list[Decoded]  # column c = ∂y/∂xᵢ,c lives in output space: through lm_head


def row_col_features(
    block: torch.Tensor, model: nn.Module, tokenizer, n_features: int = 10, k_tokens: int = 1, *,
    through_norm: bool = False, signs: str = "positive",
) -> RowColFeatures:
    """The n_features largest-norm rows and columns of block: (d_out, d_in), decoded to tokens (Fig 4A)."""
    if block.ndim != 2:
        raise LLLMError(f"row_col_features needs one Jacobian block (d_out, d_in), got shape {tuple(block.shape)}")
    if not 1 <= check_int(n_features, "n_features") <= min(block.shape):
        raise ArgumentError(f"n_features must be between 1 and {min(block.shape)}, got {n_features}")
    row_norms = torch.linalg.vector_norm(block, dim=1)
    col_norms = torch.linalg.vector_norm(block, dim=0)
    rows = torch.topk(row_norms, n_features).indices
    cols = torch.topk(col_norms, n_features).indices
    return RowColFeatures(
        row_norms=row_norms, col_norms=col_norms, rows=rows.tolist(),
        row_tokens=decode_input(block[rows], model, tokenizer, k_tokens, signs=signs),
        cols=cols.tolist(),
        col_tokens=decode_output(block[:, cols].mT, model, tokenizer, k_tokens, through_norm=through_norm,
                                 signs=signs),
    )


def decode_svd(
    decomposition: SVD, model: nn.Module, tokenizer, k_vectors: int = 3, k_tokens: int = 5, *,
    through_norm: bool = False, signs: str = "positive",
) -> list[dict]:
    """The top k_vectors triplets decoded: U columns → output tokens (lm_head), V rows → input tokens (cosine).

    A right singular vector of width d is decoded whole ("v"); one of a token-combined SVD (width
    T·d) is decoded token by token ("v_by_token", T entries). Returns one JSON-serializable dict per
    triplet: {"index", "singular_value", "u", "v" or "v_by_token"}.
    """
    return decode_svds([decomposition], model, tokenizer, k_vectors, k_tokens, through_norm=through_norm,
                       signs=signs)[0]


def decode_svds(
    decompositions: Sequence[SVD], model: nn.Module, tokenizer, k_vectors: int = 3, k_tokens: int = 5, *,
    through_norm: bool = False, signs: str = "positive",
) -> list[list[dict]]:
    """`decode_svd` of each decomposition, all their vectors in one lm_head product and one embedding product: each
    product reads the whole (V, d) matrix (671 MB for Gemma 3), which costs more than the vectors themselves."""
    if not decompositions:
        return []
    check_int(k_vectors, "k_vectors")
    d = model.get_input_embeddings().embedding_dim
    rights = []
    for decomposition in decompositions:
        check_type(decomposition, SVD, "decomposition", "pass one SVD, e.g. lllm.token_svds(result)[-1]")
        if not 1 <= k_vectors <= decomposition.k:
            raise ArgumentError(f"k_vectors must be between 1 and the SVD's {decomposition.k} triplets, got "
                                f"{k_vectors}")
        width = decomposition.Vh.shape[1]
        if width % d:
            raise LLLMError(f"right singular vectors of width {width} are not one or more input embeddings of size "
                            f"{d}")
        rights.append(split_right_vectors(decomposition, width // d)[:k_vectors])  # (k, T, d)
    u_tokens = decode_output(torch.cat([one.U[:, :k_vectors].mT for one in decompositions]), model, tokenizer,
                             k_tokens, through_norm=through_norm, signs=signs)
    v_tokens = decode_input(torch.cat([right.reshape(-1, d) for right in rights]), model, tokenizer, k_tokens,
                            signs=signs)
    tables, u_at, v_at = [], 0, 0
    for decomposition, right in zip(decompositions, rights):
        n_tokens, table = right.shape[1], []
        for i in range(k_vectors):
            entry = {"index": i, "singular_value": float(decomposition.S[i]), "u": u_tokens[u_at + i].to_dict()}
            per_token = [decoded.to_dict() for decoded in v_tokens[v_at + i * n_tokens: v_at + (i + 1) * n_tokens]]
            if n_tokens == 1:
                entry["v"] = per_token[0]
            else:
                entry["v_by_token"] = per_token
            table.append(entry)
        tables.append(table)
        u_at, v_at = u_at + k_vectors, v_at + k_vectors * n_tokens
    return tables


def projection_onto(reference: SVD, decomposition: SVD, k: int = 2) -> torch.Tensor:
    """P: (k, k), P[a, b] = u_a · ū_b: signed projection of the a-th left singular vector onto the reference's b-th.

    Used for Fig 6B (a layer's top-k onto the final layer's top-k). Signed after the sign
    convention of `svd`, so both decompositions should be oriented the same way (e.g. by the same
    reference vector); |P| is independent of it.
    """
    if reference.U.shape[0] != decomposition.U.shape[0]:
        raise LLLMError(f"left singular vectors of different spaces: {reference.U.shape[0]} vs "
                        f"{decomposition.U.shape[0]} entries")
    if not 1 <= k <= min(reference.k, decomposition.k):
        raise ArgumentError(f"k must be between 1 and {min(reference.k, decomposition.k)}, got {k}")
    dtype = torch.promote_types(reference.U.dtype, decomposition.U.dtype)
    return decomposition.U[:, :k].to(dtype).mT @ reference.U[:, :k].to(dtype)
