"""The public reference code's Jacobian strategy, re-implemented for a like-with-like benchmark.

The reference (github.com/jamesgolden1/llms-are-llms) freezes the same factors as `lllm.detached`
(its freeze is mathematically identical; we reuse lllm's so that only the *strategy* differs),
then, for every number a figure needs, calls

    torch.autograd.functional.jacobian(f, x, vectorize=True)

on a function f of the whole input, materializing the full Jacobian with no chunking:

- final J⁺ and the ordinary J: f = embeddings (T, d) → last-position output after the final norm;
- cumulative, once per layer ℓ: f_ℓ = embeddings → (layer ℓ output, its attention output, its MLP
  output) at the last position, each read through the final norm (logit lens);
- layer-wise, once per layer ℓ: f_ℓ = layer ℓ's input hidden states (T, d) → the same three outputs
  (no final norm);

then a full (thin) SVD, `torch.linalg.svd`, of every per-token block and of every layer's
token-combined (d, T·d) matrix. Generous choices, documented in RESULTS.md: one `jacobian` call per
layer returns all three components at once, the forward stops after layer ℓ, and SVDs are thin
(`full_matrices=False`), not the default full square factors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.functional import jacobian

from lllm.kernel.jacobian import embed, final_hidden, tokenize
from lllm.kernel.oplevel import detached

COMPONENTS = ("layer", "attn", "mlp")
_SUBMODULE = {"attn": "self_attn", "mlp": "mlp"}


@dataclass
class ReferenceAnalysis:
    """The reference's per-prompt data: every Jacobian materialized, every spectrum from a full SVD."""

    final: torch.Tensor  # (d, T, d): J⁺ of the output embedding
    ordinary: torch.Tensor  # (d, T, d): the ordinary (non-detached) J
    inputs: torch.Tensor  # (T, d): x
    output: torch.Tensor  # (d,): y
    cumulative: dict[str, torch.Tensor]  # component -> (L, d, T, d)
    layerwise: dict[str, torch.Tensor]  # component -> (L, d, T, d)
    token_spectra: torch.Tensor  # (T, d): singular values of every J⁺ᵢ
    layer_spectra: dict[str, torch.Tensor]  # component -> (L, d), cumulative
    layerwise_spectra: dict[str, torch.Tensor]  # component -> (L, d)
    timings: dict[str, float]  # seconds per phase

    def stable_ranks(self, kind: str = "cumulative") -> dict[str, list[float]]:
        """component -> Σ S²/S²_max per layer, of the cumulative or layer-wise spectra."""
        spectra = self.layer_spectra if kind == "cumulative" else self.layerwise_spectra
        return {c: [float((s.double() ** 2).sum() / s.double().max() ** 2) for s in spectra[c]] for c in spectra}


class _Stop(Exception):
    """Raised after the captured layer, so that later layers are not computed."""


def _component_outputs(layer: nn.Module, run, stop: bool) -> dict[str, torch.Tensor]:
    """Run `run()` with hooks on layer/attention/MLP; return each output (B, T, d), optionally stopping after the layer."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, out):
            captured[name] = out[0] if isinstance(out, tuple) else out
            if stop and name == "layer":
                raise _Stop

        return hook

    modules = {"layer": layer, **{c: getattr(layer, m) for c, m in _SUBMODULE.items()}}
    handles = [modules[c].register_forward_hook(keep(c)) for c in ("attn", "mlp", "layer")]
    try:
        run()
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def full_jacobian(model: nn.Module, x: torch.Tensor, *, detach: bool = True) -> torch.Tensor:
    """J: (d, T, d) of the last output embedding w.r.t. x (T, d), in one vectorized `jacobian` call."""
    f = lambda inputs: final_hidden(model, inputs)  # noqa: E731
    if not detach:
        return jacobian(f, x, vectorize=True)
    with detached(model):
        return jacobian(f, x, vectorize=True)


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Every layer's input hidden states (1, T, d) and call kwargs, from one forward."""
    saved = []
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: saved.append((args[0] if args else kwargs["hidden_states"],
                                                  {k: v for k, v in kwargs.items() if k != "hidden_states"})),
            with_kwargs=True,
        )
        for layer in model.get_decoder().layers
    ]
    try:
        with torch.no_grad():
            final_hidden(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return saved


def _thin_svdvals(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Singular values from a full thin SVD (U, S, Vh all computed, as the reference does): (n, r)."""
    return torch.stack([torch.linalg.svd(m, full_matrices=False).S for m in matrices])


def reference_analysis(model: nn.Module, tokenizer, prompt: str | Sequence[int],
                       layers: Sequence[int] | None = None) -> ReferenceAnalysis:
    """The reference's per-prompt computation: full J⁺ and J, cumulative and layer-wise Jacobians, all SVDs."""
    x = embed(model, tokenize(tokenizer, prompt))  # (T, d)
    d, T = x.shape[1], x.shape[0]
    decoder = model.get_decoder()
    layers = list(range(len(decoder.layers))) if layers is None else list(layers)
    timings, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name], clock = time.perf_counter() - clock, time.perf_counter()

    final = full_jacobian(model, x)
    with torch.no_grad():
        output = final_hidden(model, x)
    lap("final_jacobian")
    ordinary = full_jacobian(model, x, detach=False)
    lap("ordinary_jacobian")
    cumulative = {c: [] for c in COMPONENTS}
    layerwise = {c: [] for c in COMPONENTS}
    with detached(model):
        for ell in layers:
            layer = decoder.layers[ell]

            def through_norm(inputs: torch.Tensor, layer=layer) -> tuple[torch.Tensor, ...]:
                outs = _component_outputs(layer, lambda: decoder(inputs_embeds=inputs[None], use_cache=False), True)
                return tuple(decoder.norm(outs[c][0, -1]) for c in COMPONENTS)

            for c, jac in zip(COMPONENTS, jacobian(through_norm, x, vectorize=True)):
                cumulative[c].append(jac)
        lap("cumulative_jacobians")
        inputs = _layer_inputs(model, x)
        for ell in layers:
            layer, (hidden, kwargs) = decoder.layers[ell], inputs[ell]

            def alone(h: torch.Tensor, layer=layer, kwargs=kwargs) -> tuple[torch.Tensor, ...]:
                outs = _component_outputs(layer, lambda: layer(h[None], **kwargs), False)
                return tuple(outs[c][0, -1] for c in COMPONENTS)

            for c, jac in zip(COMPONENTS, jacobian(alone, hidden[0], vectorize=True)):
                layerwise[c].append(jac)
        lap("layerwise_jacobians")
    cumulative = {c: torch.stack(v) for c, v in cumulative.items()}
    layerwise = {c: torch.stack(v) for c, v in layerwise.items()}
    combined = lambda jac: [j.reshape(d, T * d) for j in jac]  # noqa: E731
    token_spectra = _thin_svdvals(final.permute(1, 0, 2))
    layer_spectra = {c: _thin_svdvals(combined(cumulative[c])) for c in COMPONENTS}
    layerwise_spectra = {c: _thin_svdvals(combined(layerwise[c])) for c in COMPONENTS}
    lap("svds")
    return ReferenceAnalysis(
        final=final, ordinary=ordinary, inputs=x, output=output, cumulative=cumulative, layerwise=layerwise,
        token_spectra=token_spectra, layer_spectra=layer_spectra, layerwise_spectra=layerwise_spectra,
        timings=timings,
    )
