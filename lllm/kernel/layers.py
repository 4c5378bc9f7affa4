"""Layer-by-layer detached Jacobians (paper Fig. 6, Tables 1–3).

Two kinds, each for the layer output (with residual) and the attention and MLP outputs (before their residual adds):

- cumulative: input embeddings x (T, d) → that output at `position`, read through the final norm (logit-lens style,
  with its own frozen rsqrt) as the paper does. At the last layer this is the final detached Jacobian.
- layer-wise: layer ℓ alone, its input hidden states (T, d) → its output at `position`.

One detached forward *records* every frozen factor. With the factors replayed, the network is a fixed linear map,
so Jacobians come from either side of it:

- forward mode: the replayed network applied to a batch of basis vectors e_(i,k) yields column (i, k) of every
  requested Jacobian at once (T·d columns, shared by all layers and components). The replay skips what the frozen
  factors make constant (Q, K, RoPE, softmax, the frozen MLP branch), and a tangent at token i runs on tokens
  i…position only (causal attention);
- reverse mode: batched VJPs, d_out rows per requested output.

`method="auto"` picks the cheaper by counting token-layer passes, and takes reverse mode where a record cannot be
replayed on a batch (MoE routing, tokens flattened with the batch). Biases make the maps affine; their constant c
is the replayed network applied to a zero input, computed independently of y.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lllm.errors import ReplayError, UnsupportedModelError
from lllm.kernel.parts import DecoderParts, decoder_parts
from lllm.kernel.jacobian import (
    JacobianResult, embed, final_hidden, refusing_raw_errors, relative_error, reverse_jacobian,
    self_check, text_config, tokenize,
)
from lllm.kernel.oplevel import additive_duals, detached
from lllm.kernel.tracing import (
    LayerTrace, causal_basis, check_result_fits, component_module, has_biases, sweep_chunk_size, without_biases,
)
from lllm.validation import check_choice, check_chunk_size, check_components, check_layers, check_position, grad_enabled

COMPONENTS = ("layer", "attn", "mlp")
METHODS = ("auto", "forward", "reverse")


@dataclass
class LayerJacobians:
    """Detached Jacobians of layer/attention/MLP outputs for a set of layers."""

    kind: str  # "cumulative" or "layerwise"
    layers: list[int]
    jacobian: dict[str, torch.Tensor]  # component -> (L, d_out, T, d_in)
    output: dict[str, torch.Tensor]  # component -> (L, d_out): the vectors the Jacobians reconstruct
    bias: dict[str, torch.Tensor] | None  # component -> (L, d_out), or None for bias-free models
    inputs: torch.Tensor  # cumulative: x (T, d_in); layer-wise: each layer's input (L, T, d_in)
    token_ids: list[int]
    tokens: list[str]
    through_norm: bool
    method: str
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def reconstruction(self, component: str) -> torch.Tensor:
        """Σᵢ J_ℓ,ᵢ xᵢ (+ c) for every layer: (L, d_out)."""
        x = self.inputs if self.kind == "layerwise" else self.inputs.expand(len(self.layers), *self.inputs.shape)
        jac = self.jacobian[component]
        y_hat = (jac.reshape(*jac.shape[:2], -1) @ x.reshape(x.shape[0], -1, 1))[..., 0]  # (L, d_out)
        return y_hat if self.bias is None else y_hat + self.bias[component]

    def relative_errors(self, component: str) -> list[float]:
        """The reconstruction error of every layer's output for `component`."""
        y_hat = self.reconstruction(component)
        return [relative_error(y, y_h) for y, y_h in zip(self.output[component], y_hat)]

    def combined(self, component: str, layer: int) -> torch.Tensor:
        """The token-combined (d_out, T·d_in) matrix of one layer (by layer number)."""
        jac = self.jacobian[component][self.layers.index(layer)]
        return jac.reshape(jac.shape[0], -1)


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


@dataclass(frozen=True)
class _Request:
    """A layer readout's checked options and inputs: token_ids, x0 (T, d), the keys [(ℓ, component)]."""

    token_ids: list[int]
    x0: torch.Tensor
    layers: list[int]
    components: tuple[str, ...]
    position: int
    method: str
    chunk_size: int
    mlp_split: str
    progress: bool
    keys: list[tuple[int, str]]


def _request(model, tokenizer, prompt_or_ids, *, layers=None, components=COMPONENTS, position=-1, method="auto",
             chunk_size=None, mlp_split="activation", progress=True) -> _Request:
    """The checked ReadoutOptions of a layer readout, before any work; refuses a result that would not fit in memory."""
    components, chunk_size = check_components(components, COMPONENTS), check_chunk_size(chunk_size)
    layers = check_layers(layers, text_config(model).num_hidden_layers)
    check_choice(method, "method", METHODS)
    token_ids = tokenize(tokenizer, prompt_or_ids)
    position = check_position(position, len(token_ids))
    chunk_size = chunk_size or sweep_chunk_size(model, len(token_ids), model.dtype)
    x0 = embed(model, token_ids)  # (T, d)
    keys = [(ell, c) for ell in layers for c in components]
    check_result_fits(len(keys), x0.shape[-1], len(token_ids), x0.shape[-1], x0.dtype, x0.device)
    return _Request(token_ids, x0, layers, components, position, method, chunk_size, mlp_split, progress, keys)


@grad_enabled
def cumulative_jacobians(model: nn.Module, tokenizer, prompt_or_ids, *, through_norm: bool = True,
                         **options: Unpack[ReadoutOptions]) -> LayerJacobians:
    """Cumulative J⁺: input embeddings → each layer/attention/MLP output at `position` (Fig. 6A–C), read through
    the final norm unless through_norm=False; `options`: see ReadoutOptions."""
    r = _request(model, tokenizer, prompt_or_ids, **options)
    d, T, depth = r.x0.shape[-1], len(r.token_ids), r.layers[-1] + 1
    # forward: T·d basis tangents through `depth` layers; reverse: d rows back through T tokens and ℓ+1 layers each
    chosen = _choose(r.method, d * _forward_token_layers(r.position, depth), d * T * sum(ell + 1 for ell, _ in r.keys))
    run = lambda how: _cumulative(model, tokenizer, r.token_ids, r.x0, r.layers, r.components,  # noqa: E731
                                     r.position, through_norm, r.mlp_split, how, r.chunk_size, r.progress)
    return _self_checked(_with_fallback(model, run, r.method, chosen), "cumulative")


@grad_enabled
def layerwise_jacobians(model: nn.Module, tokenizer, prompt_or_ids,
                        **options: Unpack[ReadoutOptions]) -> LayerJacobians:
    """Layer-wise J⁺: layer ℓ alone, input hidden states (T, d) → its outputs at `position` (Fig. 6D); `options`:
    see ReadoutOptions."""
    r = _request(model, tokenizer, prompt_or_ids, **options)
    d, T = r.x0.shape[-1], len(r.token_ids)
    chosen = _choose(r.method, d * T * T, d * T * len(r.components))  # its basis sweep runs every token (no window)
    run = lambda how: _layerwise(model, tokenizer, r.token_ids, r.x0, r.layers, r.components,  # noqa: E731
                                    r.position, r.mlp_split, how, r.chunk_size, r.progress)
    return _self_checked(_with_fallback(model, run, r.method, chosen), "layer-wise")


class _LayerRun(nn.Module):
    """Layer ℓ alone as a module: (hidden (B, T, d), position) → {component: output at `position` (B, d)}."""

    def __init__(self, parts: DecoderParts, ell: int, components: Sequence[str], kwargs: dict):
        super().__init__()
        self.layer, self.parts, self.components, self.kwargs = parts.layers[ell], parts, tuple(components), kwargs

    def forward(self, hidden: torch.Tensor, position: int) -> dict[str, torch.Tensor]:
        captured = {}
        handles = [
            component_module(self.parts, self.layer, c).register_forward_hook(
                lambda m, a, out, c=c: captured.__setitem__(c, out[0] if isinstance(out, tuple) else out)
            )
            for c in self.components if c != "layer"
        ]
        try:
            out = self.layer(hidden, **self.kwargs)
            captured["layer"] = out[0] if isinstance(out, tuple) else out
        finally:
            for handle in handles:
                handle.remove()
        return {c: captured[c][:, position] for c in self.components}


class _Readouts(nn.Module):
    """The decoder as one module: inputs_embeds (1, T, d) → {(ℓ, component): output at `position` (1, d)},
    read through the final norm (its own frozen factor) when asked; later layers are not computed."""

    def __init__(self, parts: DecoderParts, layers: Sequence[int], components: Sequence[str], position: int,
                 through_norm: bool):
        super().__init__()
        if through_norm and parts.norm is None:
            raise UnsupportedModelError(f"{type(parts.decoder).__name__} has no final norm lllm can name; "
                                        "pass through_norm=False")
        self.decoder, self.parts, self.layers, self.components = parts.decoder, parts, layers, tuple(components)
        self.position, self.through_norm = position, through_norm

    def forward(self, inputs_embeds: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
        with LayerTrace(self.parts, self.layers, self.components, stop=True) as trace:
            self.decoder(inputs_embeds=inputs_embeds, use_cache=False)
        vecs = {k: trace.outputs[k][:, self.position] for k in trace.outputs}
        return {k: self.parts.norm(v) if self.through_norm else v for k, v in vecs.items()}


def _additive_term(model: nn.Module, module: nn.Module, *inputs) -> dict | None:
    """c of every output of `module` (the decoder or a layer, wrapped): one JVP over the additive parameters it
    holds, their tangents the parameters themselves. Inside `detached`; independent of the outputs."""
    with fwAD.dual_level():
        duals = additive_duals(model, module)
        if not duals:
            return None
        outs = functional_call(module, duals, inputs)
        tangents = {k: fwAD.unpack_dual(v).tangent for k, v in outs.items()}
    return {k: torch.zeros_like(outs[k][0]) if t is None else t[0].detach() for k, t in tangents.items()}


def _cumulative(model, tokenizer, token_ids, x0, layers, components, position, through_norm, mlp_split, method,
                   chunk_size, progress):
    """Cumulative J⁺ at the op level (any decoder): a forward sweep of the replayed network, or reverse mode."""
    keys, n_tokens, start = [(ell, c) for ell in layers for c in components], len(token_ids), time.perf_counter()
    parts, d_in = decoder_parts(model), x0.shape[-1]
    readouts = _Readouts(parts, layers, components, position, through_norm)
    with detached(model, mlp_split=mlp_split) as lin:
        x = x0.clone().requires_grad_(True)  # with grad, also when only recording: an escaped tensor is refused
        with lin.recording(), torch.enable_grad():
            outs = readouts(x[None].clone())
        targets = {k: v[0] for k, v in outs.items()}
        for (ell, comp), y in targets.items():
            lin.check_linear(y, f"the {comp} output of layer {ell}")
        method = _sweep_allowed(lin, method)
        report = lin.report()
        d_out = targets[keys[0]].shape[0]
        stacked, jac = _allocate(layers, components, (d_out, n_tokens, d_in), x0.dtype, x0.device)
        if method == "reverse":
            for k in tqdm(keys, desc="cumulative J⁺ (reverse)", disable=not progress, leave=False):
                jac[k].copy_(reverse_jacobian(targets[k], x, min(64, d_out), False, ""))
            lin.mark_live(x0)
            bias = _additive_term(model, readouts, x0[None].clone())
        else:
            lin.finish_record(list(outs.values()))
            with lin.replay(), torch.no_grad():  # the affine map at x = 0: c, independently of y
                bias = {k: v[0] for k, v in readouts(torch.zeros_like(x0)[None]).items()} if has_biases(model) else None
            cut = _Readouts(parts, layers, components, -1, through_norm)
            chunks = list(causal_basis(position, d_in, chunk_size, x0.dtype, x0.device))
            with torch.no_grad(), without_biases(model):
                for i, ks, basis in tqdm(chunks, desc="cumulative J⁺ (forward)", disable=not progress, leave=False):
                    with lin.replay(i, position + 1):
                        columns = cut(basis)
                    for k in keys:
                        jac[k][:, i, ks] = columns[k].T  # (B, d) columns J⁺e_(i,k)
    result = _assemble("cumulative", layers, components, stacked, targets, bias, x0, token_ids, tokenizer,
                       through_norm, method, time.perf_counter() - start)
    result.meta.update(position=position, linearization=report)
    return result


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


def _sweep_allowed(lin, method: str) -> str:
    """The forward sweep replays one recorded forward on a batch: not where frozen indices select rows (MoE)."""
    if method == "forward" and not lin.batch_safe:
        raise ReplayError("x-dependent indices select rows (MoE routing): the record cannot be replayed on a batch")
    return method


def _self_checked(result: LayerJacobians, kind: str) -> LayerJacobians:
    """result, once every component's outputs are reconstructed to float precision (else LinearizationError)."""
    for comp in result.jacobian:
        self_check(max(result.relative_errors(comp)), result.inputs.dtype, f"{kind} {comp} outputs")
    return result


def _with_fallback(model: nn.Module, run, requested: str, chosen: str):
    """run(chosen); where the forward sweep cannot replay this model, reverse mode (or a clear refusal if asked)."""
    try:
        with refusing_raw_errors(model):
            return run(chosen)
    except ReplayError:
        if requested == "forward":
            raise UnsupportedModelError(
                "the forward sweep replays the recorded forward on a batch of basis vectors, which this model does not "
                "allow (x-dependent indices select rows, as in MoE routing, or frozen values are flattened with the "
                "batch); use method='reverse' or 'auto'") from None
        with refusing_raw_errors(model):
            return run("reverse")


def _layerwise(model, tokenizer, token_ids, x0, layers, components, position, mlp_split, method, chunk_size,
                  progress):
    """Layer-wise J⁺ at the op level (any decoder): replayed basis sweeps (full length), or reverse mode."""
    parts, n_tokens, start = decoder_parts(model), len(token_ids), time.perf_counter()
    keys = [(ell, c) for ell in layers for c in components]
    targets, bias, layer_inputs, jac, stacked = {}, {}, [], {}, None
    with detached(model, mlp_split=mlp_split) as lin:
        x = x0.clone().requires_grad_(True)  # recorded with grad: an x-dependent tensor the mode missed is refused
        with lin.recording(), torch.enable_grad(), LayerTrace(parts, layers, components, stop=True) as trace:
            parts.decoder(inputs_embeds=x[None].clone(), use_cache=False)
        method = _sweep_allowed(lin, method)
        lin.finish_record([trace.outputs[k] for k in keys])
        for ell in tqdm(layers, desc=f"layer-wise J⁺ ({method})", disable=not progress, leave=False):
            hidden, kwargs = trace.layer_inputs[ell]
            run = _LayerRun(parts, ell, components, kwargs)
            layer_inputs.append(hidden[0].detach())
            d_out, d_in = trace.outputs[(ell, components[0])].shape[-1], hidden.shape[-1]
            if stacked is None:
                stacked, jac = _allocate(layers, components, (d_out, n_tokens, d_in), x0.dtype, x0.device)
            if method == "reverse":
                h = hidden.detach().clone().requires_grad_(True)
                outs = run(h, position)
                h0 = hidden.detach().clone()
                lin.mark_live(h0)
                c = _additive_term(model, run, h0, position)
                for comp in components:
                    lin.check_linear(outs[comp], f"the {comp} output of layer {ell}")
                    targets[(ell, comp)], bias[(ell, comp)] = outs[comp][0].detach(), None if c is None else c[comp]
                    jac[(ell, comp)].copy_(reverse_jacobian(outs[comp][0], h, min(64, d_out), False, "")[:, 0])
                continue
            for comp in components:
                targets[(ell, comp)] = trace.outputs[(ell, comp)][0, position].detach()
            zero = torch.zeros_like(hidden)
            lin.mark_live(zero)
            with lin.replay(), torch.no_grad():
                c = run(zero, position)
            for comp in components:
                bias[(ell, comp)] = c[comp][0] if has_biases(model) else None
            with torch.no_grad(), without_biases(model):
                for i, ks, basis in causal_basis(position, d_in, chunk_size, x0.dtype, x0.device):
                    padded = torch.cat([basis.new_zeros(basis.shape[0], i, d_in), basis,
                                        basis.new_zeros(basis.shape[0], n_tokens - position - 1, d_in)], 1)
                    lin.mark_live(padded)
                    with lin.replay():
                        columns = run(padded, position)
                    for comp in components:
                        jac[(ell, comp)][:, i, ks] = columns[comp].T  # columns J⁺e_(i,k)
    has_bias = any(v is not None for v in bias.values())
    return _assemble("layerwise", layers, components, stacked, targets, bias if has_bias else None,
                     torch.stack(layer_inputs), token_ids, tokenizer, False, method, time.perf_counter() - start)


def _allocate(layers, components, shape, dtype, device) -> tuple[dict, dict]:
    """Zeroed Jacobians {component: (L, *shape)} and their views {(ℓ, component): shape} to fill in place.

    Zeroed, because a forward sweep never writes the columns of tokens after the read position.
    """
    stacked = {c: torch.zeros(len(layers), *shape, dtype=dtype, device=device) for c in components}
    return stacked, {(ell, c): stacked[c][n] for n, ell in enumerate(layers) for c in components}


def _assemble(kind, layers, components, jacobian, targets, bias, inputs, token_ids, tokenizer, norm, method, secs):
    """Collect the (L, …) Jacobians and the per-(layer, component) outputs into a LayerJacobians."""
    stack = lambda table, comp: torch.stack([table[(ell, comp)] for ell in layers])  # noqa: E731
    return LayerJacobians(
        kind=kind,
        layers=list(layers),
        jacobian=jacobian,
        output={c: stack(targets, c).detach() for c in components},
        bias=None if bias is None else {c: stack(bias, c) for c in components},
        inputs=inputs.detach(),
        token_ids=token_ids,
        tokens=[tokenizer.decode([i]) for i in token_ids],
        through_norm=norm,
        method=method,
        seconds=secs,
    )
