"""What the layer readouts and steering share: hooks that capture each layer's input and component outputs,
the causal basis a forward sweep feeds the replayed network, its chunk size, and the biases switched off."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lllm.errors import MemoryBudgetError, StopForward, UnsupportedModelError
from lllm.kernel.jacobian import available_memory, text_config
from lllm.kernel.oplevel import additive_parameters
from lllm.kernel.parts import SUBMODULE_NAMES, DecoderParts


class LayerTrace:
    """Forward hooks that capture each layer's input (and call kwargs) and its component outputs."""

    def __init__(self, parts: DecoderParts, layers: Iterable[int], components: Sequence[str], stop: bool):
        self.parts = parts
        self.layers, self.components = sorted(set(layers)), tuple(components)
        self.layer_inputs: dict[int, tuple[torch.Tensor, dict]] = {}
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}  # (ℓ, component) -> (B, T, d)
        self.stop_at = self.layers[-1] if stop else None
        self._handles: list = []

    def __enter__(self) -> LayerTrace:
        for ell in self.layers:
            layer = self.parts.layers[ell]
            self._handles.append(layer.register_forward_pre_hook(self._save_input(ell), with_kwargs=True))
            for comp in self.components:
                module = component_module(self.parts, layer, comp)
                self._handles.append(module.register_forward_hook(self._save_output(ell, comp)))
        if self.stop_at is not None:  # registered last, so it runs after the layer's own capture
            self._handles.append(self.parts.layers[self.stop_at].register_forward_hook(self._stop))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        return exc_type is StopForward  # swallow the early stop, re-raise anything else

    def _save_input(self, ell: int):
        def hook(module, args, kwargs):
            # every argument by name (GPT-2's blocks take the mask positionally), the first being the hidden states
            bound = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
            extra = bound.pop(next(iter(inspect.signature(module.forward).parameters)))
            bound.update(bound.pop("kwargs", {}))  # a **kwargs parameter arrives as one dict
            self.layer_inputs[ell] = (extra, bound)

        return hook

    def _save_output(self, ell: int, comp: str):
        def hook(module, args, output):
            self.outputs[(ell, comp)] = output[0] if isinstance(output, tuple) else output

        return hook

    @staticmethod
    def _stop(module, args, output):
        raise StopForward


def component_module(parts: DecoderParts, layer: nn.Module, comp: str) -> nn.Module:
    """The module whose output is `comp` of this layer: the layer itself, its attention, or its MLP."""
    if comp == "layer":
        return layer
    if comp not in parts.submodules:
        raise UnsupportedModelError(f"{type(layer).__name__} has no {comp!r} submodule lllm can name (tried "
                                    f"{', '.join(SUBMODULE_NAMES[comp])}); ask for components=['layer'] only")
    return getattr(layer, parts.submodules[comp])


def has_biases(model: nn.Module) -> bool:
    """True when the model has additive parameters (biases, position tables): its maps are affine."""
    return bool(additive_parameters(model))


@contextmanager
def without_biases(model: nn.Module) -> Iterator[None]:
    """Every additive parameter (biases, position tables) set to zero, restored bit-for-bit on exit.

    Under replay the frozen factors do not depend on the input, so the network is then exactly
    x ↦ J⁺x: basis tangents give the columns J⁺eₖ directly. Computing them as (J⁺eₖ + c) − c
    instead loses all precision when c ≫ J⁺eₖ (Qwen2.5's v biases: 4e-4 in float32).
    """
    saved = [(p, p.detach().clone()) for p in (getattr(m, attr) for m, attr, _ in additive_parameters(model))]
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def check_result_fits(n: int, d_out: int, n_tokens: int, d_in: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> None:
    """Refuse a set of layer Jacobians that would not fit in the memory of `device`."""
    need = n * d_out * n_tokens * d_in * (torch.finfo(dtype).bits // 8)
    available = available_memory(device)
    if need > 0.6 * available:
        raise MemoryBudgetError(
            f"{n} layer Jacobians of {n_tokens} tokens need {need / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB available: pass fewer `layers`/`components` or a shorter prompt"
        )


def causal_basis(position: int, d_in: int, chunk_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Yield (i, ks, E): basis vectors e_(i,k), k in ks, on the tokens i…position only, E (B, position-i+1, d).

    Causal attention carries nothing backwards, so a tangent at token i is zero before i and tokens
    after `position` never reach it: the sweep runs Σᵢ (position-i+1) tokens instead of T² per d.
    """
    for i in range(position + 1):
        for k0 in range(0, d_in, chunk_size):
            ks = torch.arange(k0, min(k0 + chunk_size, d_in), device=device)
            basis = torch.zeros(len(ks), position - i + 1, d_in, dtype=dtype, device=device)
            basis[torch.arange(len(ks), device=device), 0, ks] = 1.0
            yield i, ks, basis


def sweep_chunk_size(model: nn.Module, n_tokens: int, dtype: torch.dtype, budget: int | None = None) -> int:
    """Basis vectors per replayed pass of a forward sweep: all d of a token where they fit in `budget` bytes
    (default: an eighth of the free memory, at most 2 GiB), else as many as fit.

    Fewer, larger passes pay the op-level interceptor's per-op cost fewer times: on SmolLM2 at T = 7 the
    cumulative sweep took 31.0 s with all 576 vectors per pass against 33.0 s with 256 (benchmarks/OPLEVEL.md).
    A pass holds about B × T × (4d + 3·intermediate) numbers at once (the MLP's are the largest).
    """
    cfg = text_config(model)
    d = cfg.hidden_size
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * d
    per_vector = n_tokens * (4 * d + 3 * intermediate) * (torch.finfo(dtype).bits // 8)
    budget = min(available_memory(model.device) // 8, 2**31) if budget is None else budget
    return max(1, min(d, budget // per_vector))
