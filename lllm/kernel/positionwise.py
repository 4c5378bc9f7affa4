"""Replayed MLPs composed into one matrix per token, for the layer readouts' forward sweep and VJPs.

With its frozen factors replayed, a decoder's MLP maps each token's hidden state on its own, out_t = M_t h_t, with
M_t (d_out, d_in) = W_down · diag(frozen activation_t) · W_up for a gated MLP. A forward sweep pushes (t+1)·d tangents
through token t of every MLP, each paying the MLP's (d × intermediate) products. Composing M_t once costs d tangents
per token (the replayed MLP applied to the identity at every token), after which each tangent costs one
(d_out × d_in) product:

    per layer, T tokens:  Σₜ (t+1)·d · cost(MLP)   →   T·d · cost(MLP) + Σₜ (t+1)·d · d_out·d_in

SmolLM2 at T = 7 (d = 576, intermediate 1536): about 57 → 25 GFLOP per layer. The layer-wise VJPs of an output
read at one token need that token's map alone, where a probe shows the layer reads no other token's MLP output
(`only_own_token_read`).

No module names or architecture is assumed beyond "the module `lllm.kernel.parts` names the MLP": a map is composed
from the replayed module itself, and it replaces the module only after a random probe through both agrees to float
precision (a module that mixes tokens, that the record does not describe, or that carries the user's hooks stays
as recorded). The layer readouts'
reconstruction self-check then covers the whole sweep, as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lllm.errors import ReplayError
from lllm.kernel.jacobian import available_memory, relative_error
from lllm.kernel.oplevel import OpLinearization
from lllm.kernel.optable import L

# A composed map must reproduce the replayed module on a random probe this closely (std relative error); the
# difference is the rounding of two orders of summation, about 1e-7 in float32 and 1e-16 in float64.
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


@dataclass
class ModuleCall:
    """One recorded call of a module: its hidden states (1, T, d_in), its other arguments, its output's shape."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    output_shape: tuple[int, ...] | None


@contextmanager
def calls_of(modules: Sequence[nn.Module]) -> Iterator[dict[nn.Module, list[ModuleCall]]]:
    """Capture every call of `modules` (hooks), to compose them from the recorded forward."""
    calls: dict[nn.Module, list[ModuleCall]] = {m: [] for m in modules}

    def before(module, args, kwargs):
        hidden = args[0] if args else None
        calls[module].append(ModuleCall(hidden, tuple(args[1:]), dict(kwargs), None))

    def after(module, args, kwargs, output):
        calls[module][-1].output_shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before, with_kwargs=True),
                                             m.register_forward_hook(after, with_kwargs=True))]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def worth_composing(n_tokens: int, positions_swept: int, n_modules: int, d_in: int, d_out: int,
                    dtype: torch.dtype, device: torch.device) -> bool:
    """Whether composing pays: the sweep sends more than twice the tangents through each token of a module than
    composing does (Σₜ (t+1)·d against T·d), the dtype is float32 or float64 (in half precision a composed map
    would round differently from the recorded ops), and every map fits in an eighth of the free memory."""
    if dtype not in PROBE_TOLERANCE:
        return False
    sweep = positions_swept * (positions_swept + 1) // 2
    size = n_modules * n_tokens * d_in * d_out * torch.finfo(dtype).bits // 8
    return sweep >= 2 * n_tokens and size <= available_memory(device) // 8


def hooked(module: nn.Module) -> bool:
    """Whether hooks of the user's run around `module`'s forward: a composed map (which includes their effect)
    would have them applied a second time to its output. Call before lllm registers its own."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def compose(lin: OpLinearization, calls: dict[nn.Module, list[ModuleCall]]) -> dict[nn.Module, torch.Tensor]:
    """{module: maps (T, d_out, d_in)} for every module called once on (1, T, d_in) that the probe shows
    position-wise; run inside `without_biases`, so that each map is linear. Others are left out (run as recorded),
    as is a module whose replay on the identity fails (an in-place op on what the shortcut returns, say)."""
    maps = {}
    for module, seen in calls.items():
        if len(seen) != 1 or not _composable(seen[0]) or seen[0].hidden.dtype not in PROBE_TOLERANCE:
            continue
        call = seen[0]
        _, n_tokens, d_in = call.hidden.shape
        eye = torch.eye(d_in, dtype=call.hidden.dtype, device=call.hidden.device)
        basis = eye[:, None, :].expand(d_in, n_tokens, d_in).contiguous()  # (d_in, T, d_in): e_k at every token
        probe = torch.randn(call.hidden.shape, generator=torch.Generator().manual_seed(0),
                            dtype=call.hidden.dtype).to(call.hidden.device)
        lin.identity_input = basis  # its first product is the weight itself: no (T·d_in, d_in) GEMM by I
        try:
            columns = _replayed(lin, module, basis, call)  # (d_in, T, d_out): M_t e_k
            lin.identity_input = None
            direct = _replayed(lin, module, probe, call)  # (1, T, d_out)
        except ReplayError:
            continue
        finally:
            lin.identity_input = None
        with lin.bypassed():  # engine arithmetic on the replay's results: constants from here on, untagged
            composed = columns.permute(1, 2, 0).contiguous()  # (T, d_out, d_in)
            error = relative_error(direct, apply_maps(probe, composed))
        if error <= PROBE_TOLERANCE[call.hidden.dtype]:
            maps[module] = composed
    return maps


def _composable(call: ModuleCall) -> bool:
    """A call on hidden states (1, T, d) alone, returning one tensor (1, T, d_out) (no routing, no extra tensors)."""
    extra = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, torch.Tensor)]
    return (isinstance(call.hidden, torch.Tensor) and call.hidden.dim() == 3 and call.hidden.shape[0] == 1
            and not extra and call.output_shape is not None and len(call.output_shape) == 3
            and call.output_shape[:2] == tuple(call.hidden.shape[:2]))


def _replayed(lin: OpLinearization, module: nn.Module, hidden: torch.Tensor, call: ModuleCall) -> torch.Tensor:
    """The replayed module applied to `hidden` (B, T, d_in) at every token of the record."""
    lin.mark_live(hidden)
    with lin.replay(), torch.no_grad():
        return module(hidden, *call.args, **call.kwargs)


def apply_maps(hidden: torch.Tensor, maps: torch.Tensor, gradient_token: int | None = None) -> torch.Tensor:
    """out[b, t] = maps[t] @ hidden[b, t]: hidden (B, W, d_in), maps (W, d_out, d_in) → (B, W, d_out); with a
    gradient_token, only that token's output carries a gradient (the others are computed as constants)."""
    if not torch.is_grad_enabled():
        return torch.bmm(hidden.transpose(0, 1), maps.mT).transpose(0, 1)  # (W, B, d_in) @ (W, d_in, d_out)
    # under autograd, one product per token: batched VJPs (vmap) of a broadcast bmm would copy the maps per row
    rows = []
    for t in range(hidden.shape[1]):
        with torch.set_grad_enabled(gradient_token is None or t == gradient_token):
            rows.append(hidden[:, t] @ maps[t].T)
    return torch.stack(rows, 1)


@dataclass
class StandIn:
    """How the composed modules run within `composed`: `gradient_token` keeps autograd to that token's output (the
    VJPs of an output read at one token need no other, where `only_own_token_read` holds); `noise` adds a seeded
    random vector to every other token's output (the probe of that)."""

    gradient_token: int | None = None
    noise: bool = False


@contextmanager
def composed(lin: OpLinearization, maps: dict[nn.Module, torch.Tensor]) -> Iterator[StandIn]:
    """Within: each module of `maps` runs as its composed map on a replay's token window (tokens lin.start…),
    outside lllm's interceptor (the ops it would see are not the recorded ones); restored on exit."""
    stand_in = StandIn()

    def forward_of(maps_of_module: torch.Tensor):
        def forward(hidden, *args, **kwargs):
            with lin.bypassed():
                window = maps_of_module[lin.start : lin.start + hidden.shape[1]]  # (W, d_out, d_in)
                if hidden.dim() != 3 or window.shape[0] != hidden.shape[1]:
                    raise ReplayError(f"a composed MLP got hidden states of shape {tuple(hidden.shape)} in the "
                                      f"token window {lin.start}…: not the (B, W, d) of a replay of its record")
                token = None if stand_in.gradient_token is None else stand_in.gradient_token - lin.start  # in window
                out = apply_maps(hidden, window, token)
                if stand_in.noise:
                    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
                    noise[:, token] = 0
                    out = out + noise.to(out.device)
            lin.tags[out] = L
            return out
        return forward

    saved = {module: module.__dict__.get("forward") for module in maps}  # an instance's own forward (a wrapper)
    for module, module_maps in maps.items():
        module.forward = forward_of(module_maps)  # an instance attribute shadows the class's forward
    try:
        yield stand_in
    finally:
        for module, own in saved.items():
            if own is None:
                del module.forward
            else:
                module.forward = own


def only_own_token_read(lin: OpLinearization, stand_in: StandIn, run, hidden: torch.Tensor, position: int) -> bool:
    """Whether `run(hidden, position)` (a replayed layer, its MLP composed) reads its MLP's output at `position` alone:
    its outputs are bit for bit the same when random vectors are added to the MLP's output at every other token.
    (No decoder mixes tokens after its MLP; a layer that did would keep its gradient at every token.)"""
    lin.mark_live(hidden)
    with torch.no_grad(), lin.replay():
        plain = run(hidden, position)
    stand_in.noise, stand_in.gradient_token = True, position
    try:
        lin.mark_live(hidden)
        with torch.no_grad(), lin.replay():
            moved = run(hidden, position)
    finally:
        stand_in.noise, stand_in.gradient_token = False, None
    return all(torch.equal(plain[k], moved[k]) for k in plain)
