"""The engines behind the layer readouts (`lllm.kernel.layers`): what each runs, on which side of the frozen map.

- `replayed_jacobians`: one recorded forward serves both kinds. Its MLPs are composed into one matrix per token
  (`lllm.kernel.positionwise`), then
  - cumulative: a forward sweep of the replayed network over the causal basis (T·d tangents, shared by every layer
    and component; a tangent at token i runs on tokens i…position only);
  - layer-wise: batched VJPs of each replayed layer (d rows per component), at batch 1.
- `reverse_cumulative`, `reverse_layerwise`: batched VJPs through the linearized forward itself, for records that
  cannot be replayed on a batch (MoE routing, tokens flattened with the batch).
- `basis_layerwise`: each layer replayed on basis vectors (method="forward").

Biases make the maps affine: their constant c is the replayed network applied to a zero input, or a JVP over the
additive parameters, computed independently of y; the Jacobians themselves come from bias-free replays.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lllm.errors import ReplayError, UnsupportedModelError
from lllm.kernel.jacobian import relative_error, reverse_jacobian
from lllm.kernel.oplevel import OpLinearization, additive_duals, detached
from lllm.kernel.parts import DecoderParts, decoder_parts
from lllm.kernel.positionwise import (
    StandIn, calls_of, compose, composed, hooked, linear_stand_ins, own_token_modules, worth_composing,
)
from lllm.kernel.tracing import LayerTrace, causal_basis, component_module, has_biases, without_biases


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
        # one matrix-vector product per layer: a batched matmul with one column runs ~6× slower on the CPU
        y_hat = torch.stack([m.reshape(m.shape[0], -1) @ v.reshape(-1) for m, v in zip(jac, x)])  # (L, d_out)
        return y_hat if self.bias is None else y_hat + self.bias[component]

    def relative_errors(self, component: str) -> list[float]:
        """The reconstruction error of every layer's output for `component`."""
        y_hat = self.reconstruction(component)
        return [relative_error(y, y_h) for y, y_h in zip(self.output[component], y_hat)]

    def combined(self, component: str, layer: int) -> torch.Tensor:
        """The token-combined (d_out, T·d_in) matrix of one layer (by layer number)."""
        jac = self.jacobian[component][self.layers.index(layer)]
        return jac.reshape(jac.shape[0], -1)


@dataclass(frozen=True)
class ReadoutRequest:
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


class LayerRun(nn.Module):
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


class Readouts(nn.Module):
    """The decoder as one module: inputs_embeds (1, T, d) → {(ℓ, component): output at `position` (1, d)},
    read through the final norm (its own frozen factor) when asked; later layers are not computed. The last
    call's LayerTrace (every layer's input, every component's output at every token) stays in `trace`."""

    def __init__(self, parts: DecoderParts, layers: Sequence[int], components: Sequence[str], position: int,
                 through_norm: bool):
        super().__init__()
        if through_norm and parts.norm is None:
            raise UnsupportedModelError(f"{type(parts.decoder).__name__} has no final norm lllm can name; "
                                        "pass through_norm=False")
        self.decoder, self.parts, self.layers, self.components = parts.decoder, parts, layers, tuple(components)
        self.position, self.through_norm, self.trace = position, through_norm, None

    def forward(self, inputs_embeds: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
        with LayerTrace(self.parts, self.layers, self.components, stop=True) as trace:
            self.decoder(inputs_embeds=inputs_embeds, use_cache=False)
        self.trace = trace
        vecs = {k: trace.outputs[k][:, self.position] for k in trace.outputs}
        return {k: self.parts.norm(v) if self.through_norm else v for k, v in vecs.items()}


def additive_term(model: nn.Module, module: nn.Module, *inputs) -> dict | None:
    """c of every output of `module` (the decoder or a layer, wrapped): one JVP over the additive parameters it
    holds, their tangents the parameters themselves. Inside `detached`; independent of the outputs."""
    with fwAD.dual_level():
        duals = additive_duals(model, module)
        if not duals:
            return None
        outs = functional_call(module, duals, inputs)
        tangents = {k: fwAD.unpack_dual(v).tangent for k, v in outs.items()}
    return {k: torch.zeros_like(outs[k][0]) if t is None else t[0].detach() for k, t in tangents.items()}


# ---------------------------------------------------------------------------------------------
# One record, both kinds: the replayed network with its MLPs composed
# ---------------------------------------------------------------------------------------------


def replayed_jacobians(model: nn.Module, tokenizer, r: ReadoutRequest, kinds: Sequence[str],
                       through_norm: bool) -> dict[str, LayerJacobians]:
    """{kind: LayerJacobians} for `kinds` ("cumulative", "layerwise") from one recorded forward: the cumulative
    maps by a forward sweep, the layer-wise ones by VJPs of each replayed layer; ReplayError where the record
    cannot be replayed on a batch."""
    start, n_tokens, d_in = time.perf_counter(), len(r.token_ids), r.x0.shape[-1]
    parts = decoder_parts(model)
    readouts = Readouts(parts, r.layers, r.components, r.position, through_norm)
    mlps = [m for m in mlp_modules(parts, r.layers[-1] + 1) if not hooked(m)]  # before lllm adds its own hooks
    with detached(model, mlp_split=r.mlp_split) as lin:
        x = r.x0.clone().requires_grad_(True)  # with grad, also when only recording: an escaped tensor is refused
        with lin.recording(), torch.enable_grad(), calls_of(mlps) as calls:
            outs = readouts(x[None].clone())
        trace = readouts.trace
        cumulative = {k: v[0] for k, v in outs.items()}
        layerwise = {k: trace.outputs[k][0, r.position] for k in r.keys}
        for (ell, comp), y in cumulative.items():
            lin.check_linear(y, f"the {comp} output of layer {ell}")
        sweep_allowed(lin)
        lin.finish_record(list(outs.values()) + [trace.outputs[k] for k in r.keys])
        report = lin.report()
        with torch.no_grad():  # the affine maps at a zero input: c, independently of y
            biases = _replayed_biases(model, lin, readouts, parts, trace, r, kinds)
        with torch.no_grad(), without_biases(model):
            # each MLP as one matrix per token, where that saves products (lllm.kernel.positionwise)
            worth = worth_composing(n_tokens, r.position + 1, len(mlps), d_in, d_in, r.x0.dtype, r.x0.device)
            maps = compose(lin, calls) if worth else {}
        results = {}
        linears = linear_stand_ins(lin, [parts.layers[ell] for ell in r.layers], maps) if "layerwise" in kinds else []
        with without_biases(model), composed(lin, maps, linears) as stand_in:
            for kind in kinds:
                clock = time.perf_counter()
                every_column = kind == "layerwise" or r.position == n_tokens - 1  # what the engine writes
                stacked, jac = allocate(r.layers, r.components, (cumulative[r.keys[0]].shape[-1], n_tokens, d_in),
                                        r.x0.dtype, r.x0.device, zeroed=not every_column)
                if kind == "cumulative":
                    cut = Readouts(parts, r.layers, r.components, -1, through_norm)
                    with torch.no_grad():
                        forward_sweep(lin, cut, r, jac)
                    inputs, targets = r.x0, cumulative
                else:
                    inputs, targets = _replayed_vjps(lin, parts, trace, r, jac, stand_in, [*maps, *linears]), layerwise
                results[kind] = assemble(kind, r.layers, r.components, stacked, targets, biases[kind], inputs,
                                         r.token_ids, tokenizer, through_norm and kind == "cumulative",
                                         "forward" if kind == "cumulative" else "reverse",
                                         time.perf_counter() - clock)
                results[kind].meta.update(position=r.position, linearization=report, composed_mlps=len(maps))
    shared = time.perf_counter() - start - sum(result.seconds for result in results.values())
    for result in results.values():  # the record and the composed maps, shared out
        result.seconds += shared / len(results)
    return results


def _replayed_biases(model, lin, readouts, parts, trace, r, kinds) -> dict[str, dict | None]:
    """{kind: {(ℓ, component): c}} (None for bias-free models): the replayed maps at a zero input."""
    if not has_biases(model):
        return {kind: None for kind in kinds}
    biases = {}
    if "cumulative" in kinds:
        with lin.replay():
            biases["cumulative"] = {k: v[0] for k, v in readouts(torch.zeros_like(r.x0)[None]).items()}
    if "layerwise" in kinds:
        biases["layerwise"] = {}
        for ell in r.layers:
            hidden, kwargs = trace.layer_inputs[ell]
            zero = torch.zeros_like(hidden)
            lin.mark_live(zero)
            with lin.replay():
                c = LayerRun(parts, ell, r.components, kwargs)(zero, r.position)
            biases["layerwise"].update({(ell, comp): c[comp][0] for comp in r.components})
    return biases


def forward_sweep(lin: OpLinearization, cut: Readouts, r: ReadoutRequest, jac: dict) -> None:
    """Fill `jac` with the columns J⁺e_(i,k): the replayed network applied to the causal basis, chunk by chunk."""
    chunks = list(causal_basis(r.position, r.x0.shape[-1], r.chunk_size, r.x0.dtype, r.x0.device))
    several = r.chunk_size < r.x0.shape[-1]  # passes per token window: more than one reuse dead ops' shapes
    for i, ks, basis in tqdm(chunks, desc="cumulative J⁺ (forward)", disable=not r.progress, leave=False):
        with lin.replay(i, r.position + 1, remember_dead=several):
            columns = cut(basis)
        block = slice(int(ks[0]), int(ks[-1]) + 1)  # ks is a range of features
        for k in r.keys:
            jac[k][:, i, block] = columns[k].T  # (B, d) columns J⁺e_(i,k)


def _replayed_vjps(lin: OpLinearization, parts: DecoderParts, trace: LayerTrace, r: ReadoutRequest, jac: dict,
                   stand_in: StandIn, stand_ins: Sequence[nn.Module]) -> torch.Tensor:
    """Fill `jac` with each layer's rows by batched VJPs of the replayed layer (batch 1, every token): the
    replay is linear, so its gradient is the layer-wise J⁺. Where the layer reads a stand-in's output (its composed
    MLP, its attention's output projection) at `position` alone (probed), the VJPs run through that token's rows of
    it only: the rest of its T rows would carry zero gradients. Returns the layers' inputs (L, T, d_in)."""
    inputs = []
    for ell in tqdm(r.layers, desc="layer-wise J⁺ (reverse)", disable=not r.progress, leave=False):
        hidden, kwargs = trace.layer_inputs[ell]
        inputs.append(hidden[0].detach())
        run = LayerRun(parts, ell, r.components, kwargs)
        inside = {id(m) for m in parts.layers[ell].modules()}
        candidates = [m for m in stand_ins if id(m) in inside]
        stand_in.restricted = own_token_modules(lin, stand_in, run, hidden.detach().clone(), r.position, candidates)
        h = hidden.detach().clone().requires_grad_(True)
        lin.mark_live(h)
        stand_in.gradient_token = r.position
        try:
            with torch.enable_grad():
                with lin.replay():
                    outs = run(h, r.position)
                for comp in r.components:  # batched VJPs of as many rows as the sweep's memory budget holds
                    reverse_jacobian(outs[comp][0], h, r.chunk_size, False, "", out=jac[(ell, comp)][:, None])
        finally:
            stand_in.gradient_token, stand_in.restricted = None, set()
    return torch.stack(inputs)


# ---------------------------------------------------------------------------------------------
# Records that cannot be replayed on a batch, and the layer-wise basis sweep
# ---------------------------------------------------------------------------------------------


def reverse_cumulative(model: nn.Module, tokenizer, r: ReadoutRequest, through_norm: bool) -> LayerJacobians:
    """Cumulative J⁺ by batched VJPs through the linearized forward (any decoder, MoE included)."""
    start, parts, n_tokens, d_in = time.perf_counter(), decoder_parts(model), len(r.token_ids), r.x0.shape[-1]
    readouts = Readouts(parts, r.layers, r.components, r.position, through_norm)
    with detached(model, mlp_split=r.mlp_split) as lin:
        x = r.x0.clone().requires_grad_(True)
        with lin.recording(), torch.enable_grad():
            outs = readouts(x[None].clone())
        targets = {k: v[0] for k, v in outs.items()}
        for (ell, comp), y in targets.items():
            lin.check_linear(y, f"the {comp} output of layer {ell}")
        d_out = targets[r.keys[0]].shape[0]
        stacked, jac = allocate(r.layers, r.components, (d_out, n_tokens, d_in), r.x0.dtype, r.x0.device)
        for k in tqdm(r.keys, desc="cumulative J⁺ (reverse)", disable=not r.progress, leave=False):
            reverse_jacobian(targets[k], x, min(64, d_out), False, "", out=jac[k])
        lin.mark_live(r.x0)
        bias = additive_term(model, readouts, r.x0[None].clone())
        report = lin.report()
    result = assemble("cumulative", r.layers, r.components, stacked, targets, bias, r.x0, r.token_ids, tokenizer,
                      through_norm, "reverse", time.perf_counter() - start)
    result.meta.update(position=r.position, linearization=report, composed_mlps=0)
    return result


def reverse_layerwise(model: nn.Module, tokenizer, r: ReadoutRequest) -> LayerJacobians:
    """Layer-wise J⁺ by batched VJPs through each linearized layer (any decoder, MoE included)."""
    return _layerwise(model, tokenizer, r, "reverse")


def basis_layerwise(model: nn.Module, tokenizer, r: ReadoutRequest) -> LayerJacobians:
    """Layer-wise J⁺ by replaying each layer on basis vectors at every token (method="forward")."""
    return _layerwise(model, tokenizer, r, "forward")


def _layerwise(model, tokenizer, r: ReadoutRequest, method: str) -> LayerJacobians:
    """Layer-wise J⁺ of every requested layer, by replayed basis sweeps (full length) or reverse mode."""
    parts, n_tokens, start = decoder_parts(model), len(r.token_ids), time.perf_counter()
    targets, bias, layer_inputs, jac, stacked = {}, {}, [], {}, None
    with detached(model, mlp_split=r.mlp_split) as lin:
        x = r.x0.clone().requires_grad_(True)  # recorded with grad: an x-dependent tensor the mode missed is refused
        with lin.recording(), torch.enable_grad(), LayerTrace(parts, r.layers, r.components, stop=True) as trace:
            parts.decoder(inputs_embeds=x[None].clone(), use_cache=False)
        if method == "forward":
            sweep_allowed(lin)
        lin.finish_record([trace.outputs[k] for k in r.keys])
        for ell in tqdm(r.layers, desc=f"layer-wise J⁺ ({method})", disable=not r.progress, leave=False):
            hidden, kwargs = trace.layer_inputs[ell]
            run = LayerRun(parts, ell, r.components, kwargs)
            layer_inputs.append(hidden[0].detach())
            d_out, d_in = trace.outputs[(ell, r.components[0])].shape[-1], hidden.shape[-1]
            if stacked is None:
                stacked, jac = allocate(r.layers, r.components, (d_out, n_tokens, d_in), r.x0.dtype, r.x0.device)
            if method == "reverse":
                h = hidden.detach().clone().requires_grad_(True)
                outs = run(h, r.position)
                h0 = hidden.detach().clone()
                lin.mark_live(h0)
                c = additive_term(model, run, h0, r.position)
                for comp in r.components:
                    lin.check_linear(outs[comp], f"the {comp} output of layer {ell}")
                    targets[(ell, comp)], bias[(ell, comp)] = outs[comp][0].detach(), None if c is None else c[comp]
                    reverse_jacobian(outs[comp][0], h, min(64, d_out), False, "", out=jac[(ell, comp)][:, None])
                continue
            for comp in r.components:
                targets[(ell, comp)] = trace.outputs[(ell, comp)][0, r.position].detach()
            zero = torch.zeros_like(hidden)
            lin.mark_live(zero)
            with lin.replay(), torch.no_grad():
                c = run(zero, r.position)
            for comp in r.components:
                bias[(ell, comp)] = c[comp][0] if has_biases(model) else None
            with torch.no_grad(), without_biases(model):
                for i, ks, basis in causal_basis(r.position, d_in, r.chunk_size, r.x0.dtype, r.x0.device):
                    padded = torch.cat([basis.new_zeros(basis.shape[0], i, d_in), basis,
                                        basis.new_zeros(basis.shape[0], n_tokens - r.position - 1, d_in)], 1)
                    lin.mark_live(padded)
                    with lin.replay():
                        columns = run(padded, r.position)
                    for comp in r.components:
                        jac[(ell, comp)][:, i, ks] = columns[comp].T  # columns J⁺e_(i,k)
    has_bias = any(v is not None for v in bias.values())
    return assemble("layerwise", r.layers, r.components, stacked, targets, bias if has_bias else None,
                    torch.stack(layer_inputs), r.token_ids, tokenizer, False, method, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def sweep_allowed(lin: OpLinearization) -> None:
    """A replay on a batch applies one recorded forward to it: not where frozen indices select rows (MoE)."""
    if not lin.batch_safe:
        raise ReplayError("x-dependent indices select rows (MoE routing): the record cannot be replayed on a batch")


def mlp_modules(parts: DecoderParts, depth: int) -> list[nn.Module]:
    """The MLP modules of the first `depth` layers, or none where the decoder has no MLP lllm can name."""
    if "mlp" not in parts.submodules:
        return []
    return [component_module(parts, parts.layers[ell], "mlp") for ell in range(depth)]


def allocate(layers, components, shape, dtype, device, zeroed: bool = True) -> tuple[dict, dict]:
    """Jacobians {component: (L, *shape)} and their views {(ℓ, component): shape} to fill in place; zeroed unless
    the caller writes every entry (a forward sweep never writes the columns of tokens after the read position)."""
    new = torch.zeros if zeroed else torch.empty
    stacked = {c: new(len(layers), *shape, dtype=dtype, device=device) for c in components}
    return stacked, {(ell, c): stacked[c][n] for n, ell in enumerate(layers) for c in components}


def assemble(kind, layers, components, jacobian, targets, bias, inputs, token_ids, tokenizer, norm, method, secs):
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
