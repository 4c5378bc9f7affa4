"""Matrix-free top-k singular triplets of the detached Jacobian, for prompts too long to form J.

J⁺ = [J⁺₀ … J⁺_T] is (d_out, T·d_in). Forming it takes d_out reverse passes over all T tokens and
d_out·T·d_in numbers; its top-k triplets need far fewer Jacobian-vector products. Inside
`detached(model)` one forward keeps the live graph of y = f(x*), and both products run on it:

- Jᵀ·U, reverse mode ("VJP"): batched `autograd.grad(y, x, U)` gives Jᵀu (T, d_in), every token at once.
- J·V, forward mode ("JVP"): g(u) = Jᵀu is linear in u, so J v = ∂⟨g(u), v⟩/∂u. The graph of g is
  built once (`create_graph=True`), then batched backwards through it give J V: the exact
  derivative with no constant to subtract (models with biases), on the graph the VJPs already
  hold. Replaying the recorded linear network (`OpLinearization.replay`, what the layer sweeps use)
  measured only about 1.2× faster per vector on SmolLM2 at 128 tokens (16 vectors, side by side).

`topk_svd` is a seeded randomized SVD (Halko, Martinsson & Tropp 2011: range finder with power
iterations and re-orthonormalization) whose Rayleigh–Ritz step uses the span of *all* power
iterates (block Krylov, Musco & Musco 2015), not the last one only. That costs no extra product
and, since the subspace contains HMT's, its singular values are at least as accurate.

Sign convention, that of `lllm.analyses.decompose.svd`: each pair (uⱼ, vⱼ), defined only up to a joint flip,
is oriented so that uⱼ·y > 0, y the output embedding (where uⱼ·y = 0: its largest |entry| > 0).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from tqdm.auto import tqdm

from lllm.kernel.svd import orientation_signs, svd
from lllm.errors import MemoryBudgetError, OperatorError, PromptError
from lllm.kernel.jacobian import (
    available_memory, bias_term, embed, estimate_jacobian_bytes, final_hidden, relative_error, self_check, text_config,
    tokenize,
)
from lllm.kernel.oplevel import MLP_SPLITS, detached
from lllm.validation import check_choice, check_chunk_size, check_int, check_position, grad_enabled

STRATEGIES = ("auto", "exact", "randomized")


@dataclass
class ProductCount:
    """How many Jacobian-vector products an operator has applied, by mode (one backward pass each)."""

    jvp: int = 0  # J v, for tangents v (T, d_in)
    vjp: int = 0  # Jᵀu, for cotangents u (d_out,)


def product_chunk_size(model: nn.Module, n_tokens: int, dtype: torch.dtype, budget: int = 2**28) -> int:
    """Vectors per batched product: one layer's transient gradients stay under `budget` bytes, ≤ 64."""
    cfg = model.config
    item = torch.finfo(dtype).bits // 8
    # per vector and layer: residual-stream (d) and MLP (intermediate) gradients of every token,
    # with ~4 such tensors alive at once
    per_vector = 4 * n_tokens * (cfg.hidden_size + cfg.intermediate_size) * item
    return max(1, min(64, budget // per_vector))


class DetachedOperator:
    """J⁺ at one input as a linear operator of shape (d_out, T·d_in), used inside a `with` block.

    On entry one detached forward keeps the graph of y (and one backward the graph of Jᵀu), and one
    forward-mode JVP with tangent x checks the reconstruction without forming J (`relative_error`;
    LinearizationError if it fails). The model stays detached until exit. Memory: the two graphs,
    plus, per batch of products, about chunk_size × T × (d + intermediate) numbers per layer;
    hence `chunk_size` (default: `product_chunk_size`).
    """

    def __init__(
        self, model: nn.Module, x: torch.Tensor, position: int = -1, mlp_split: str = "activation",
        *, chunk_size: int | None = None,
    ):
        d = model.config.hidden_size
        if not isinstance(x, torch.Tensor):
            raise OperatorError(f"x must be a tensor of input embeddings (T, {d}), got {type(x).__name__}; "
                                "use DetachedOperator.from_prompt for text or token ids")
        if x.ndim != 2 or x.shape[1] != d or x.shape[0] == 0:
            raise OperatorError(f"x must be input embeddings of shape (T ≥ 1, {d}), got {tuple(x.shape)}")
        if x.dtype != model.dtype:
            raise OperatorError(f"x is {x.dtype} but the model is {model.dtype}")
        self.model, self.inputs = model, x.detach()
        self.mlp_split = check_choice(mlp_split, "mlp_split", MLP_SPLITS)
        self.position = check_position(position, x.shape[0])
        self.chunk_size = check_chunk_size(chunk_size) or product_chunk_size(model, x.shape[0], x.dtype)
        self.counts = ProductCount()
        self.output: torch.Tensor | None = None  # y (d_out,), set on entry
        self.bias: torch.Tensor | None = None  # c (d_out,) for models with biases, set on entry
        self.relative_error: float | None = None  # std(y − Σᵢ J⁺ᵢxᵢ − c)/std(y), set on entry
        self._stack: ExitStack | None = None

    @classmethod
    def from_prompt(cls, model: nn.Module, tokenizer, prompt_or_ids, **kw) -> DetachedOperator:
        """The operator of a prompt (text or token ids), embedded by the model's own embedding module."""
        return cls(model, embed(model, tokenize(tokenizer, prompt_or_ids)), **kw)

    @property
    def n_tokens(self) -> int:
        return self.inputs.shape[0]

    @property
    def d_in(self) -> int:
        return self.inputs.shape[1]

    @property
    def d_out(self) -> int:
        return text_config(self.model).hidden_size

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, T·d_in): the token-combined matrix [J⁺₀ … J⁺_T]."""
        return self.d_out, self.n_tokens * self.d_in

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs.dtype

    @grad_enabled
    def __enter__(self) -> DetachedOperator:
        if self._stack is not None:
            raise OperatorError("this DetachedOperator is already open")
        _check_graph_fits(self.model, self.n_tokens, self.chunk_size, self.dtype)
        self._stack = ExitStack()
        try:
            lin = self._stack.enter_context(detached(self.model, mlp_split=self.mlp_split))
            with torch.enable_grad():
                self._x = self.inputs.clone().requires_grad_(True)
                self._y = final_hidden(self.model, self._x, self.position)  # (d_out,)
                lin.check_linear(self._y, "the output embedding y")
                self._u = torch.zeros(self.d_out, dtype=self.dtype, device=self.inputs.device, requires_grad=True)
                (self._jtu,) = torch.autograd.grad(self._y, self._x, grad_outputs=self._u, create_graph=True)
            self.output = self._y.detach()
            self.bias = bias_term(self.model, self.inputs, self.position)
            self._check()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _check(self) -> None:
        """Set `relative_error` from a forward-mode JVP with tangent x; refuse a matvec that differs from it."""
        with fwAD.dual_level():
            dual = fwAD.make_dual(self.inputs, self.inputs)
            derivative = fwAD.unpack_dual(final_hidden(self.model, dual, self.position)).tangent  # Σᵢ J⁺ᵢxᵢ
        self.relative_error = relative_error(self.output, derivative if self.bias is None else derivative + self.bias)
        self_check(self.relative_error, self.dtype, "the final output embedding")
        self_check(relative_error(derivative, self.matvec(self.inputs[None])[0]), self.dtype, "J⁺x by matvec")
        self.counts = ProductCount()  # the check's product is not the caller's

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None
        self._x = self._y = self._u = self._jtu = None  # frees the graphs

    def _require_open(self) -> None:
        if self._stack is None:
            raise OperatorError("the DetachedOperator is closed: use it inside `with DetachedOperator(...) as op:`")

    @grad_enabled
    def matvec(self, tangents: torch.Tensor) -> torch.Tensor:
        """J V: tangents (B, T, d_in) → (B, d_out), by batched backwards through the graph of Jᵀu."""
        self._require_open()
        if tangents.ndim != 3 or tangents.shape[1:] != self.inputs.shape:
            expected = f"(B, {self.n_tokens}, {self.d_in})"
            raise OperatorError(f"tangents must have shape {expected}, got {tuple(tangents.shape)}")
        out = [self._grads(self._jtu, self._u, chunk) for chunk in tangents.to(self.dtype).split(self.chunk_size)]
        self.counts.jvp += tangents.shape[0]
        return torch.cat(out) if out else tangents.new_zeros(0, self.d_out, dtype=self.dtype)

    @grad_enabled
    def rmatvec(self, cotangents: torch.Tensor) -> torch.Tensor:
        """Jᵀ U: cotangents (B, d_out) → (B, T, d_in), every token's J⁺ᵢᵀu from one batched backward."""
        self._require_open()
        if cotangents.ndim != 2 or cotangents.shape[1] != self.d_out:
            raise OperatorError(f"cotangents must have shape (B, {self.d_out}), got {tuple(cotangents.shape)}")
        out = [self._grads(self._y, self._x, chunk) for chunk in cotangents.to(self.dtype).split(self.chunk_size)]
        self.counts.vjp += cotangents.shape[0]
        return torch.cat(out) if out else cotangents.new_zeros(0, self.n_tokens, self.d_in, dtype=self.dtype)

    @staticmethod
    def _grads(output: torch.Tensor, wrt: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """∂⟨output, bᵢ⟩/∂wrt for each bᵢ of the batch: (B, *output.shape) → (B, *wrt.shape)."""
        (grad,) = torch.autograd.grad(output, wrt, grad_outputs=batch, is_grads_batched=True, retain_graph=True)
        return grad


def _check_graph_fits(model: nn.Module, n_tokens: int, chunk_size: int, dtype: torch.dtype) -> None:
    """Refuse a prompt whose recorded graph and product buffers would not fit in memory."""
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and n_tokens > max_pos:
        raise PromptError(f"the prompt has {n_tokens} tokens, more than the model's {max_pos} positions")
    d, item = model.config.hidden_size, torch.finfo(dtype).bits // 8
    # the reverse-mode Jacobian's estimate less its two last terms (J and a chunk of its rows), never built here
    need = estimate_jacobian_bytes(model, n_tokens, chunk_size, dtype) - (d + chunk_size) * n_tokens * d * item
    available = available_memory(model.device)
    if need > 0.8 * available:
        raise MemoryBudgetError(
            f"the graph of a {n_tokens}-token forward needs about {need / 2**30:.1f} GiB (chunk_size={chunk_size}) "
            f"but only {available / 2**30:.1f} GiB are available: use a shorter prompt or a smaller chunk_size"
        )


# ---------------------------------------------------------------------------------------------
# Randomized top-k SVD
# ---------------------------------------------------------------------------------------------


class _Matrix:
    """The operator as a plain matrix A (d_out, n): the combined J⁺ (n = T·d_in) or one block J⁺ᵢ (n = d_in)."""

    def __init__(self, op: DetachedOperator, token: int | None):
        if token is not None and not -op.n_tokens <= token < op.n_tokens:
            raise OperatorError(f"token {token} is outside the {op.n_tokens}-token prompt")
        self.op, self.token = op, None if token is None else token % op.n_tokens
        self.n = op.shape[1] if token is None else op.d_in

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """A v: (n, b) → (d_out, b)."""
        op, b = self.op, v.shape[1]
        if self.token is None:
            tangents = v.T.reshape(b, op.n_tokens, op.d_in)
        else:  # tangents supported at the one token
            tangents = v.new_zeros(b, op.n_tokens, op.d_in)
            tangents[:, self.token] = v.T
        return op.matvec(tangents).T

    def apply_t(self, u: torch.Tensor) -> torch.Tensor:
        """Aᵀ u: (d_out, b) → (n, b)."""
        grads = self.op.rmatvec(u.T)  # (b, T, d_in)
        return (grads.reshape(u.shape[1], -1) if self.token is None else grads[:, self.token]).T


def _orthonormalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal (n, b) spanning w (n, b) minus its part in basis (n, m); two passes, one loses orthogonality."""
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
        w = torch.linalg.qr(w).Q
    return w


def _orient(u: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip pairs by `lllm.analyses.decompose.svd`'s convention (uⱼ·y > 0): u (d_out, k), v (k, …), y (d_out,)."""
    signs = orientation_signs(u[None], y)[0]  # (k,)
    return u * signs, v * signs.reshape(-1, *[1] * (v.ndim - 1))


def topk_svd(
    op: DetachedOperator, k: int, *, oversample: int = 8, power_iters: int = 2, block_size: int | None = None,
    seed: int = 0, token: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k triplets U (d_out, k), S (k,), V (k, T, d_in) of [J⁺₀ … J⁺_T]; V is (k, d_in) for J⁺_token.

    Each iteration adds b = block_size columns (default k + oversample, HMT's ℓ) to the subspace, so
    the cost is at most b·(power_iters + 1) VJPs and as many JVPs, against d_out VJPs for the full J.
    The sketch starts on the small output side: b random cotangents give b vectors in the row
    space of J⁺ (all tokens at once); each power iteration then applies J⁺ and J⁺ᵀ, and the
    Rayleigh–Ritz step uses the span of every iterate. For the same number of products a block
    smaller than k with more iterations is more accurate (a higher-degree Krylov polynomial):
    on SmolLM2 at 256 tokens (benchmarks/matfree_t256.py) the top-8 σ came within 4e-3 with the
    defaults (96 products) and within 3e-6 with block_size=4, power_iters=8 (72 products). The
    subspace stops growing at min(d_out, n) columns, where it holds the whole row space: then the
    result is exact.
    Deterministic for a given seed (torch.Generator); signs as in `lllm.analyses.decompose.svd` (uⱼ·y > 0).
    """
    op._require_open()
    matrix = _Matrix(op, token)
    max_rank = min(op.d_out, matrix.n)
    block = min(k + oversample if block_size is None else block_size, max_rank)
    if not 1 <= check_int(k, "k") <= max_rank:
        raise OperatorError(f"k must be between 1 and {max_rank} for this matrix, got {k!r}")
    if oversample < 0 or power_iters < 0 or block < 1:
        raise OperatorError(
            f"need oversample ≥ 0, power_iters ≥ 0, block_size ≥ 1; got {oversample}, {power_iters}, {block}"
        )
    if min(block * (power_iters + 1), max_rank) < k:
        columns = block * (power_iters + 1)
        raise OperatorError(f"block_size·(power_iters + 1) = {columns} columns cannot hold k={k} triplets")
    generator = torch.Generator().manual_seed(seed)
    device = op.inputs.device  # drawn on the CPU (the same numbers on any device), used where the model is
    omega = torch.randn(op.d_out, block, generator=generator, dtype=op.dtype).to(device)  # (d_out, b)
    krylov = torch.zeros(matrix.n, 0, dtype=op.dtype, device=device)  # (n, m): orthonormal, grows by b per step
    images = torch.zeros(op.d_out, 0, dtype=op.dtype, device=device)  # (d_out, m): A @ krylov
    w = matrix.apply_t(omega)  # (n, b)
    for step in range(power_iters + 1):
        q = _orthonormalize(w, krylov)[:, : max_rank - krylov.shape[1]]
        aq = matrix.apply(q)  # (d_out, b)
        krylov, images = torch.cat([krylov, q], 1), torch.cat([images, aq], 1)
        if step == power_iters or krylov.shape[1] == max_rank:
            break
        w = matrix.apply_t(aq)
    u, s, wh = torch.linalg.svd(images, full_matrices=False)  # A·krylov = u s whᵀ
    v = (krylov @ wh[:k].T).T  # (k, n)
    u, v = _orient(u[:, :k], v, op.output)
    shape = (k, op.n_tokens, op.d_in) if token is None else (k, op.d_in)
    return u, s[:k], v.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Per-token top-k for every token
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenSpectra:
    """Top-k singular triplets of every per-token block J⁺ᵢ."""

    S: torch.Tensor  # (T, k)
    U: torch.Tensor  # (T, d_out, k), oriented so that U[i, :, j]·y > 0 (see `lllm.analyses.decompose.svd`)
    V: torch.Tensor  # (T, k, d_in)
    strategy: str  # "exact" or "randomized"
    products: ProductCount  # products this call applied


def all_token_topk(
    op: DetachedOperator, k: int, *, strategy: str = "auto", memory_budget: int | None = None,
    oversample: int = 8, power_iters: int = 2, block_size: int | None = None, seed: int = 0, progress: bool = True,
) -> TokenSpectra:
    """Top-k triplets of every block J⁺ᵢ, by the strategy that needs fewer products.

    "exact": J⁺ by d_out VJPs (each yields a row of every block at once), kept only for as many tokens
    as fit in `memory_budget` bytes (default: a quarter of the available memory), so that
    ⌈T / tokens per pass⌉ passes cost d_out VJPs each; then an SVD per block.
    "randomized": `topk_svd(token=i)` for every token (same options), at most
    2·block_size·(power_iters + 1) products per token. (A Gram matrix per token would not save
    memory: for square blocks T·d_out² numbers are as many as J itself.) "auto" counts products,
    JVPs and VJPs alike (each is one backward pass over all T tokens), and picks the cheaper.
    """
    op._require_open()
    if strategy not in STRATEGIES:
        raise OperatorError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not 1 <= check_int(k, "k") <= min(op.d_out, op.d_in):
        raise OperatorError(f"k must be between 1 and {min(op.d_out, op.d_in)}, got {k!r}")
    budget = available_memory(op.inputs.device) // 4 if memory_budget is None else memory_budget
    tokens_per_pass = min(op.n_tokens, budget // (op.d_out * op.d_in * (torch.finfo(op.dtype).bits // 8)))
    exact_cost = math.ceil(op.n_tokens / tokens_per_pass) * op.d_out if tokens_per_pass else math.inf
    block = k + oversample if block_size is None else block_size
    randomized_cost = op.n_tokens * 2 * min(block * (power_iters + 1), op.d_out, op.d_in)
    if strategy == "auto":
        strategy = "exact" if exact_cost <= randomized_cost else "randomized"
    if strategy == "exact" and not tokens_per_pass:
        raise MemoryBudgetError(
            f"one {op.d_out}×{op.d_in} block does not fit in memory_budget={budget} bytes; "
            "raise it or use strategy='randomized'"
        )
    before = ProductCount(op.counts.jvp, op.counts.vjp)
    if strategy == "exact":
        triplets = _exact_blocks(op, k, tokens_per_pass, progress)
    else:
        options = dict(oversample=oversample, power_iters=power_iters, block_size=block_size, seed=seed)
        triplets = [topk_svd(op, k, token=i, **options)
                    for i in tqdm(range(op.n_tokens), desc="per-token top-k", disable=not progress, leave=False)]
    u, s, v = (torch.stack(parts) for parts in zip(*triplets))
    used = ProductCount(op.counts.jvp - before.jvp, op.counts.vjp - before.vjp)
    return TokenSpectra(S=s, U=u, V=v, strategy=strategy, products=used)


def _exact_blocks(op: DetachedOperator, k: int, tokens_per_pass: int, progress: bool) -> list[tuple]:
    """[(U (d_out, k), S (k,), V (k, d_in))] per token, from J⁺ built ⌈T/tokens_per_pass⌉ times by VJPs."""
    eye = torch.eye(op.d_out, dtype=op.dtype, device=op.inputs.device)
    row_starts = range(0, op.d_out, op.chunk_size)
    triplets = []
    for first in range(0, op.n_tokens, tokens_per_pass):
        tokens = slice(first, min(first + tokens_per_pass, op.n_tokens))
        blocks = torch.empty(op.d_out, tokens.stop - first, op.d_in, dtype=op.dtype, device=op.inputs.device)
        for start in tqdm(row_starts, desc="J⁺ rows", disable=not progress, leave=False):
            rows = slice(start, start + op.chunk_size)
            blocks[rows] = op.rmatvec(eye[rows])[:, tokens]
        for j in range(blocks.shape[1]):
            block = svd(blocks[:, j], k, reference=op.output)
            triplets.append((block.U, block.S, block.Vh))
    return triplets
