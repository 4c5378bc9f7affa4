"""Layer-by-layer detached Jacobians (paper Fig. 6, Tables 1–3).

Two kinds, each for the layer output (with residual) and the attention and MLP outputs (before their residual adds):

- cumulative: input embeddings x (T, d) → that output at `position`, read through the final norm (logit-lens style,
  with its own frozen rsqrt) as the paper does. At the last layer this is the final detached Jacobian.
- layer-wise: layer ℓ alone, its input hidden states (T, d) → its output at `position`.

One detached forward *records* every frozen factor. With the factors replayed, the network is a fixed linear map,
so Jacobians come from either side of it (the engines are in `lllm.kernel.readouts`):

- forward mode: the replayed network applied to a batch of basis vectors e_(i,k) yields column (i, k) of every
  requested Jacobian at once (T·d columns, shared by all layers and components). The replay skips what the frozen
  factors make constant (Q, K, RoPE, softmax, the frozen MLP branch), runs each MLP as one matrix per token, and a
  tangent at token i runs on tokens i…position only (causal attention);
- reverse mode: batched VJPs, d_out rows per requested output (of each replayed layer, for the layer-wise maps).

`method="auto"` picks the cheaper by counting token-layer passes, and takes reverse mode through the linearized
forward where a record cannot be replayed on a batch (MoE routing, tokens flattened with the batch).
`layer_jacobians` computes both kinds from one record. Biases make the maps affine; their constant c is the
replayed network applied to a zero input, computed independently of y.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypedDict, Unpack

import torch
from torch import nn

from lllm.errors import ReplayError, UnsupportedModelError
from lllm.kernel.jacobian import (
    JacobianResult, embed, final_hidden, refusing_raw_errors, relative_error, self_check, text_config, tokenize,
)
from lllm.kernel.heap import retained_heap
from lllm.kernel.oplevel import detached
from lllm.kernel.readouts import (
    LayerJacobians, ReadoutRequest, basis_layerwise, replayed_jacobians, reverse_cumulative, reverse_layerwise,
)
from lllm.kernel.tracing import check_result_fits, sweep_chunk_size
from lllm.validation import check_choice, check_chunk_size, check_components, check_layers, check_position, grad_enabled

__all__ = ["COMPONENTS", "METHODS", "LayerJacobians", "ReadoutOptions", "cumulative_jacobians", "layerwise_jacobians",
           "layer_jacobians", "final_from_cumulative"]

COMPONENTS = ("layer", "attn", "mlp")
METHODS = ("auto", "forward", "reverse")


def _forward_token_layers(position: int, depth: int) -> int:
    """Token-layer passes of one forward sweep per input feature: Σᵢ (position-i+1) tokens × depth layers."""
    return (position + 1) * (position + 2) // 2 * depth


# One output row's VJP costs about this many forward tangent passes, per token and layer: measured
# on SmolLM2 at 7 tokens, 1 thread, 52 µs per row, token and layer in reverse mode against 68–78 µs
# per tangent in a replayed forward sweep (larger GEMMs per op in reverse).
REVERSE_COST = 0.7


def _choose(method: str, forward_cost: float, reverse_cost: float) -> str:
    """"forward" or "reverse": `method` itself unless "auto", else the one with the smaller cost."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "forward" if forward_cost <= REVERSE_COST * reverse_cost else "reverse"


class ReadoutOptions(TypedDict, total=False):
    """The keyword options both layer readouts take, with their defaults."""

    layers: Sequence[int] | None  # layer numbers, negative from the end (None, the default: every layer)
    components: Sequence[str]  # of COMPONENTS (default: all three)
    position: int  # the token whose outputs are read (default: -1, the last)
    method: str  # "auto" (default), "forward" (sweep of the replayed network) or "reverse"
    chunk_size: int | None  # basis vectors per replayed pass (default: as many as fit, `sweep_chunk_size`)
    mlp_split: str  # which factor of a gated MLP is frozen: "activation" (default, paper eq. 8) or "gate"
    progress: bool  # tqdm bars (default: True)


def _request(model, tokenizer, prompt_or_ids, *, layers=None, components=COMPONENTS, position=-1, method="auto",
             chunk_size=None, mlp_split="activation", progress=True, kinds=1) -> ReadoutRequest:
    """The checked ReadoutOptions of a layer readout, before any work; refuses a result that would not fit in memory."""
    components, chunk_size = check_components(components, COMPONENTS), check_chunk_size(chunk_size)
    layers = check_layers(layers, text_config(model).num_hidden_layers)
    check_choice(method, "method", METHODS)
    token_ids = tokenize(tokenizer, prompt_or_ids)
    position = check_position(position, len(token_ids))
    chunk_size = chunk_size or sweep_chunk_size(model, len(token_ids), model.dtype)
    x0 = embed(model, token_ids)  # (T, d)
    keys = [(ell, c) for ell in layers for c in components]
    check_result_fits(kinds * len(keys), x0.shape[-1], len(token_ids), x0.shape[-1], x0.dtype, x0.device)
    return ReadoutRequest(token_ids, x0, layers, components, position, method, chunk_size, mlp_split, progress, keys)


@grad_enabled
def cumulative_jacobians(model: nn.Module, tokenizer, prompt_or_ids, *, through_norm: bool = True,
                         **options: Unpack[ReadoutOptions]) -> LayerJacobians:
    """Cumulative J⁺: input embeddings → each layer/attention/MLP output at `position` (Fig. 6A–C), read through
    the final norm unless through_norm=False; `options`: see ReadoutOptions."""
    r = _request(model, tokenizer, prompt_or_ids, **options)
    forward = lambda: replayed_jacobians(model, tokenizer, r, ("cumulative",), through_norm)["cumulative"]  # noqa: E731
    reverse = lambda: reverse_cumulative(model, tokenizer, r, through_norm)  # noqa: E731
    run = forward if _cumulative_method(r) == "forward" else reverse
    return _self_checked(_with_fallback(model, run, reverse, r.method == "forward"), "cumulative")


@grad_enabled
def layerwise_jacobians(model: nn.Module, tokenizer, prompt_or_ids,
                        **options: Unpack[ReadoutOptions]) -> LayerJacobians:
    """Layer-wise J⁺: layer ℓ alone, input hidden states (T, d) → its outputs at `position` (Fig. 6D); `options`:
    see ReadoutOptions."""
    r = _request(model, tokenizer, prompt_or_ids, **options)
    if _layerwise_method(r) == "forward":
        run = lambda: basis_layerwise(model, tokenizer, r)  # noqa: E731
    else:
        run = lambda: replayed_jacobians(model, tokenizer, r, ("layerwise",), False)["layerwise"]  # noqa: E731
    fallback = lambda: reverse_layerwise(model, tokenizer, r)  # noqa: E731
    return _self_checked(_with_fallback(model, run, fallback, r.method == "forward"), "layer-wise")


@grad_enabled
@retained_heap()  # see lllm.kernel.heap: a sweep's chunks reuse freed memory instead of faulting it back in
def layer_jacobians(model: nn.Module, tokenizer, prompt_or_ids, *, through_norm: bool = True,
                    **options: Unpack[ReadoutOptions]) -> dict[str, LayerJacobians]:
    """Both readouts of one prompt, {"cumulative": …, "layerwise": …}: the numbers of `cumulative_jacobians` and
    `layerwise_jacobians`, from one recorded forward where both replay it (its composed MLPs serve both). `method`
    applies to the cumulative maps; the layer-wise ones take "auto"."""
    r = _request(model, tokenizer, prompt_or_ids, kinds=2, **options)
    if _cumulative_method(r) == "forward" and _layerwise_method(replace(r, method="auto")) == "reverse":
        try:
            with refusing_raw_errors(model):
                both = replayed_jacobians(model, tokenizer, r, ("cumulative", "layerwise"), through_norm)
            return {"cumulative": _self_checked(both["cumulative"], "cumulative"),
                    "layerwise": _self_checked(both["layerwise"], "layer-wise")}
        except ReplayError:
            pass  # each kind then takes its own way back (reverse mode through the linearized forward)
    return {"cumulative": cumulative_jacobians(model, tokenizer, r.token_ids, through_norm=through_norm, **options),
            "layerwise": layerwise_jacobians(model, tokenizer, r.token_ids, **{**options, "method": "auto"})}


def _cumulative_method(r: ReadoutRequest) -> str:
    """The cumulative engine: forward (T·d basis tangents through `depth` layers) or reverse (d rows back through
    T tokens and ℓ+1 layers for each requested output)."""
    d, n_tokens, depth = r.x0.shape[-1], len(r.token_ids), r.layers[-1] + 1
    return _choose(r.method, d * _forward_token_layers(r.position, depth),
                   d * n_tokens * sum(ell + 1 for ell, _ in r.keys))


def _layerwise_method(r: ReadoutRequest) -> str:
    """The layer-wise engine: its basis sweep runs every token (no window), its VJPs d rows per component."""
    d, n_tokens = r.x0.shape[-1], len(r.token_ids)
    return _choose(r.method, d * n_tokens * n_tokens, d * n_tokens * len(r.components))


def final_from_cumulative(model: nn.Module, cumulative: LayerJacobians) -> JacobianResult | None:
    """The final J⁺ (of what lm_head reads at the last token) taken from a cumulative run that already holds it:
    the model's last layer output read through the final norm at the last position. None where the run does not
    hold it, or where what it read differs from what lm_head reads (a hook, a wrapper): then compute it."""
    last = len(cumulative.token_ids) - 1
    if (cumulative.kind != "cumulative" or not cumulative.through_norm or "layer" not in cumulative.jacobian
            or cumulative.layers[-1] != text_config(model).num_hidden_layers - 1
            or cumulative.meta.get("position") != last):
        return None
    output = cumulative.output["layer"][-1]
    with detached(model), torch.no_grad():  # as the run computed it (a float64 model stays float64 throughout)
        y = final_hidden(model, cumulative.inputs, -1)
    if relative_error(y, output) > 10 * torch.finfo(output.dtype).eps:
        return None
    return JacobianResult(
        jacobian=cumulative.jacobian["layer"][-1], inputs=cumulative.inputs, output=output,
        bias=None if cumulative.bias is None else cumulative.bias["layer"][-1], token_ids=cumulative.token_ids,
        tokens=cumulative.tokens, seconds=0.0,
        meta={"linearization": cumulative.meta.get("linearization"), "from": f"cumulative ({cumulative.method})"},
    )


def _self_checked(result: LayerJacobians, kind: str) -> LayerJacobians:
    """result, once every component's outputs are reconstructed to float precision (else LinearizationError)."""
    for comp in result.jacobian:
        self_check(max(result.relative_errors(comp)), result.inputs.dtype, f"{kind} {comp} outputs")
    return result


def _with_fallback(model: nn.Module, run, fallback, forward_asked: bool):
    """run(); where the record cannot be replayed on a batch, fallback() (or a clear refusal where the forward
    sweep was asked for)."""
    try:
        with refusing_raw_errors(model):
            return run()
    except ReplayError:
        if forward_asked:
            raise UnsupportedModelError(
                "the forward sweep replays the recorded forward on a batch of basis vectors, which this model does not "
                "allow (x-dependent indices select rows, as in MoE routing, or frozen values are flattened with the "
                "batch); use method='reverse' or 'auto'") from None
        with refusing_raw_errors(model):
            return fallback()
