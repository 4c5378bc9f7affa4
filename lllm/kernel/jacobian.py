"""The Jacobian engine: detached (J⁺) and ordinary Jacobians of the last output embedding.

y = f(x), x: (T, d) input embeddings, y: (d,) the final hidden state after the final norm at
`position`. With the nonlinearities frozen, f is homogeneous of order 1 in (x, biases), so
y = Σᵢ J⁺ᵢ xᵢ + c, where c is the pushforward of the bias parameters themselves (zero for models
without biases). J is computed by batched reverse mode over chunks of output rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lllm.errors import (
    ArgumentError, LinearizationError, LLLMError, MemoryBudgetError, PromptError, StopForward, UnsupportedModelError,
)
from lllm.kernel.oplevel import MLP_SPLITS, additive_duals, additive_parameters, detached
from lllm.validation import check_choice, check_chunk_size, check_position, grad_enabled, token_id_list

# Largest reconstruction error that a complete linearization can show, by dtype; above it a
# nonlinearity escaped the patches and the result is refused rather than returned.
SELF_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 5e-2}


@dataclass
class JacobianResult:
    """J⁺ of one output embedding with respect to every input embedding, with what it reconstructs."""

    jacobian: torch.Tensor  # (d_out, T, d_in): the blocks J⁺ᵢ = jacobian[:, i, :]
    inputs: torch.Tensor  # (T, d_in): x, input embeddings as the model sees them (Gemma's √d included)
    output: torch.Tensor  # (d_out,): y, the last-position hidden state after the final norm
    bias: torch.Tensor | None  # (d_out,) or None: c in y = Σ J⁺ᵢ xᵢ + c, from a JVP over the biases
    token_ids: list[int]
    tokens: list[str]
    detached: bool = True
    position: int = -1
    mlp_split: str = "activation"
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def reconstruction(self) -> torch.Tensor:
        """Σᵢ J⁺ᵢ xᵢ (+ c): (d_out,)."""
        y_hat = torch.einsum("otd,td->o", self.jacobian, self.inputs)
        return y_hat if self.bias is None else y_hat + self.bias

    @property
    def relative_error(self) -> float:
        """std(y − Σᵢ J⁺ᵢ xᵢ − c) / std(y)."""
        return relative_error(self.output, self.reconstruction())

    def block(self, i: int) -> torch.Tensor:
        """J⁺ᵢ, the (d_out, d_in) matrix of token i (negative indices count from the end)."""
        return self.jacobian[:, i, :]

    @property
    def combined(self) -> torch.Tensor:
        """[J⁺₀ … J⁺_T]: the token-combined (d_out, T·d_in) matrix."""
        return self.jacobian.reshape(self.jacobian.shape[0], -1)


def relative_error(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """std(y − ŷ)/std(y), the paper's reconstruction error."""
    return float((y - y_hat).std(correction=0) / y.std(correction=0))


def tokenize(tokenizer, prompt_or_ids: str | Sequence[int] | torch.Tensor) -> list[int]:
    """Token ids for a prompt (with the tokenizer's own special tokens) or ids passed through."""
    if isinstance(prompt_or_ids, str):
        if not prompt_or_ids.strip():
            raise PromptError("the prompt is empty; give at least one token of text (or token ids)")
        ids = tokenizer(prompt_or_ids)["input_ids"]
    elif prompt_or_ids is None:
        raise PromptError("the prompt is None; give text or a list of token ids")
    else:
        ids = token_id_list(prompt_or_ids)
    if len(ids) == 0:
        raise PromptError("the prompt has no tokens")
    return ids


def embed(model: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """x: (T, d) input embeddings through the model's own embedding module (Gemma's √d scale included)."""
    vocab = model.get_input_embeddings().num_embeddings
    bad = [i for i in token_ids if not 0 <= i < vocab]
    if bad:
        raise PromptError(f"token ids {bad[:5]} are outside the vocabulary (size {vocab})")
    ids = torch.tensor([list(token_ids)], device=model.device)
    with torch.no_grad():
        return model.get_input_embeddings()(ids)[0].detach()


def text_config(model: nn.Module):
    """The config of the text decoder (a multimodal wrapper keeps it under text_config)."""
    return model.config.get_text_config()


def final_hidden(model: nn.Module, x: torch.Tensor, position: int = -1, parameters: dict | None = None) -> torch.Tensor:
    """y: (d,) what the output embedding (lm_head) reads at `position`, from a forward of the whole model
    on input embeddings x: (T, d), with `parameters` swapped in by name if given. Hooks, a user's own
    forwards and multimodal wrappers are all on the path; the logits are never computed."""
    kwargs = {"inputs_embeds": x[None].clone(), "use_cache": False}  # a copy: some models write into it
    forward = (lambda: model(**kwargs)) if parameters is None else (lambda: functional_call(model, parameters, (), kwargs))
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None); "
                                    "lllm reads y where the output embedding reads it")
    read = {}

    def grab(module, args, kwargs):
        read["y"] = args[0] if args else next(iter(kwargs.values()))
        raise StopForward  # the logits are never computed

    handle = head.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        forward()
    except StopForward:
        pass
    finally:
        handle.remove()
    if "y" not in read:
        raise LinearizationError(f"{type(model).__name__} never called its output embedding on the input embeddings")
    return read["y"][0, position]  # (d,)


def bias_term(model: nn.Module, x: torch.Tensor, position: int = -1) -> torch.Tensor | None:
    """c: (d,), the detached Jacobian w.r.t. every additive parameter applied to those parameters (one JVP).

    Must be called inside a linearization. With the nonlinearities frozen the network is jointly
    homogeneous in (x, additive parameters: biases and position tables), so y = J⁺x + J_b b; c = J_b b is
    computed independently of y, as the tangent of one forward whose parameter tangents are the
    parameters themselves.
    """
    if not additive_parameters(model):
        return None
    with fwAD.dual_level():
        duals = additive_duals(model, model)
        tangent = fwAD.unpack_dual(final_hidden(model, x, position, parameters=duals)).tangent
    return torch.zeros_like(x[0]) if tangent is None else tangent.detach()


@grad_enabled
def jvp_reconstruction(model: nn.Module, x: torch.Tensor, position: int = -1, *, detach: bool = True) -> torch.Tensor:
    """Σᵢ Jᵢ xᵢ: (d,) from one forward-mode JVP with tangent x, without forming J (c not included).

    With detach=True this is the detached reconstruction (y − c); with detach=False it is what the
    ordinary Jacobian would reconstruct (paper Fig. 3), at the cost of one forward pass.
    """
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), x.detach())
        if detach:
            with detached(model):
                out = final_hidden(model, dual, position)
        else:
            out = final_hidden(model, dual, position)
        return fwAD.unpack_dual(out).tangent.detach()


FIT_FRACTION = 0.8  # of the free memory, what one Jacobian computation may take
# On a CPU, the estimated backward buffers of one chunk of rows, at most: past about this, batching more rows makes
# each row slower, not faster (SmolLM2 at T = 256, one thread, s per row: 8 rows 0.45, 16 0.45, 32 0.52, 64 0.53,
# 128 0.59). A GPU is not capped: it was not measured there.
CHUNK_BYTES = 2**30


def estimate_jacobian_bytes(model: nn.Module, n_tokens: int, chunk_size: int, dtype: torch.dtype) -> int:
    """A conservative peak-memory estimate (bytes) of one batched reverse-mode Jacobian."""
    cfg = text_config(model)
    d, layers = cfg.hidden_size, getattr(cfg, "num_hidden_layers", 1)
    inter = getattr(cfg, "intermediate_size", None) or 4 * d
    heads = getattr(cfg, "num_attention_heads", None) or 1
    item = torch.finfo(dtype).bits // 8
    per_token = 16 * d + 6 * inter + 4 * heads * n_tokens  # saved activations of one layer, one token
    forward = layers * n_tokens * per_token * item  # the graph kept for every chunk
    backward = 3 * chunk_size * n_tokens * per_token * item  # gradient buffers of one layer, per row
    result = d * n_tokens * d * item  # J itself
    return forward + backward + result + chunk_size * n_tokens * d * item


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free where tensors of `device` live: the GPU's free memory on CUDA, else the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(model: nn.Module, n_tokens: int, chunk_size: int, dtype: torch.dtype) -> None:
    """Refuse, with a clear message, a prompt whose Jacobian would not fit in memory."""
    max_pos = getattr(text_config(model), "max_position_embeddings", None)
    if max_pos is not None and n_tokens > max_pos:
        raise PromptError(f"the prompt has {n_tokens} tokens, more than the model's {max_pos} positions")
    need = estimate_jacobian_bytes(model, n_tokens, chunk_size, dtype)
    available = available_memory(model.device)
    if need > FIT_FRACTION * available:
        raise MemoryBudgetError(
            f"a {n_tokens}-token Jacobian needs about {need / 2**30:.1f} GiB (chunk_size={chunk_size}) but only "
            f"{available / 2**30:.1f} GiB are available. Use a shorter prompt, a smaller chunk_size, or the "
            "matrix-free top-k SVD (lllm.kernel.matfree), which never materializes J."
        )


def default_chunk_size(model: nn.Module, n_tokens: int, dtype: torch.dtype) -> int:
    """Rows per batched backward: 64 (faster and leaner than all rows at once) for short prompts; for long ones on a
    CPU as many as keep one chunk's buffers under CHUNK_BYTES (SmolLM2 in float32: 12 at T = 256, 4 at T = 512);
    always within the memory `check_fits` allows; at least 1."""
    d_out = text_config(model).hidden_size
    base = estimate_jacobian_bytes(model, n_tokens, 0, dtype)  # the estimate is linear in the chunk size
    per_row = estimate_jacobian_bytes(model, n_tokens, 1, dtype) - base
    fit = int((FIT_FRACTION * available_memory(model.device) - base) // per_row)
    lean = CHUNK_BYTES // per_row if model.device.type == "cpu" else d_out  # measured on a CPU: its caches
    return max(1, min(64, d_out, fit, lean))


def reverse_jacobian(y: torch.Tensor, x: torch.Tensor, chunk_size: int, progress: bool, desc: str,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """J = ∂y/∂x: (d_out, *x.shape), by batched VJPs over chunks of `chunk_size` output rows, written into `out`
    where given (a caller's buffer of that shape: no second copy)."""
    d_out = y.shape[0]
    if out is not None and out.shape != (d_out, *x.shape):
        raise ArgumentError(f"reverse_jacobian: out has shape {tuple(out.shape)}, J has {(d_out, *x.shape)}")
    jac = torch.empty((d_out, *x.shape), dtype=x.dtype, device=x.device) if out is None else out  # model's device
    eye = torch.eye(d_out, dtype=y.dtype, device=y.device)
    starts = range(0, d_out, chunk_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="chunk", leave=False):
        rows = eye[start : start + chunk_size]  # (c, d_out)
        (grad,) = torch.autograd.grad(y, x, grad_outputs=rows, is_grads_batched=True, retain_graph=True)
        jac[start : start + rows.shape[0]] = grad
    return jac


@grad_enabled  # users call it from evaluation code, under no_grad or inference_mode
def detached_jacobian(
    model: nn.Module,
    tokenizer,
    prompt_or_ids: str | Sequence[int] | torch.Tensor,
    *,
    position: int = -1,
    chunk_size: int | None = None,
    progress: bool = True,
    mlp_split: str = "activation",
    detach: bool = True,
) -> JacobianResult:
    """J⁺ of the output embedding at `position` w.r.t. every input embedding (detach=False: ordinary J).

    The result is self-checked: a detached J⁺ that does not reconstruct y raises LinearizationError.
    """
    chunk_size, mlp_split = check_chunk_size(chunk_size), check_choice(mlp_split, "mlp_split", MLP_SPLITS)
    token_ids = tokenize(tokenizer, prompt_or_ids)
    check_position(position, len(token_ids))
    x0 = embed(model, token_ids)  # (T, d)
    chunk_size = chunk_size or default_chunk_size(model, len(token_ids), x0.dtype)
    check_fits(model, len(token_ids), chunk_size, x0.dtype)
    tokens = [tokenizer.decode([i]) for i in token_ids]
    start = time.perf_counter()
    x = x0.clone().requires_grad_(True)
    bias, meta = None, {}
    if detach:
        with detached(model, mlp_split=mlp_split) as lin:
            with refusing_raw_errors(model):
                y = final_hidden(model, x, position)
            lin.check_linear(y, "the output embedding y")
            jac = reverse_jacobian(y, x, chunk_size, progress, "J⁺ rows")
            bias = bias_term(model, x0, position)
        meta["linearization"] = lin.report()
    else:
        with torch.enable_grad():
            y = final_hidden(model, x, position)
            jac = reverse_jacobian(y, x, chunk_size, progress, "J rows")
    result = JacobianResult(
        jacobian=jac, inputs=x0, output=y.detach(), bias=bias, token_ids=token_ids, tokens=tokens,
        detached=detach, position=position, mlp_split=mlp_split, seconds=time.perf_counter() - start, meta=meta,
    )
    if detach:
        self_check(result.relative_error, x0.dtype, "the final output embedding")
    return result


@contextmanager
def refusing_raw_errors(model: nn.Module) -> Iterator[None]:
    """Inside: an exception that is not lllm's, raised from the model's code under the linearization, is a clear
    refusal (the original chained), not a traceback."""
    try:
        yield
    except LLLMError:
        raise
    except Exception as error:  # noqa: BLE001 - the modeling code failed on what the mode returned it
        raise UnsupportedModelError(
            f"the forward of {type(model).__name__} failed under lllm's op-level linearization "
            f"({type(error).__name__}: {error}); lllm cannot give its detached Jacobian"
        ) from error


def ordinary_jacobian(model: nn.Module, tokenizer, prompt_or_ids, **kw) -> JacobianResult:
    """The ordinary (non-detached) Jacobian, which does not reconstruct y (paper Fig. 3)."""
    return detached_jacobian(model, tokenizer, prompt_or_ids, detach=False, **kw)


def self_check(error: float, dtype: torch.dtype, what: str) -> None:
    """Raise LinearizationError when a detached Jacobian fails to reconstruct its output."""
    tol = SELF_CHECK_TOLERANCE.get(dtype, 1e-1)
    if not error <= tol:
        raise LinearizationError(
            f"the detached Jacobian of {what} reconstructs it only to relative error {error:.3g} "
            f"(> {tol:g} for {dtype}): a nonlinearity was not frozen. This is a bug in lllm's op table "
            "(lllm/kernel/optable.py and rules.py)."
        )
