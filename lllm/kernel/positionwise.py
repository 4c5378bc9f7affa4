"""Replayed MLPs composed into one matrix per token, for the layer readouts' forward sweep and VJPs.

With its frozen factors replayed, a decoder's MLP maps each token's hidden state on its own, out_t = M_t h_t, with
M_t (d_out, d_in) = W_down · diag(frozen activation_t) · W_up for a gated MLP. A forward sweep pushes (t+1)·d tangents
through token t of every MLP, each paying the MLP's (d × intermediate) products. Composing M_t once costs d tangents
per token (the replayed MLP applied to the identity at every token), after which each tangent costs one
(d_out × d_in) product:

    per layer, T tokens:  Σₜ (t+1)·d · cost(MLP)   →   T·d · cost(MLP) + Σₜ (t+1)·d · d_out·d_in

SmolLM2 at T = 7 (d = 576, intermediate 1536): about 57 → 25 GFLOP per layer. The layer-wise VJPs of an output
read at one token need that token's map alone, where a probe shows the layer reads no other token's MLP output
(`own_token_modules`); the same holds for the attention's output projection (any plain `nn.Linear` the layer reads
at that token alone), whose backward then multiplies one token's rows of gradients instead of T (SmolLM2: ~2 s of a
31 s analysis).

No module names or architecture is assumed beyond "the module `lllm.kernel.parts` names the MLP": a map is composed
from the replayed module itself, and it replaces the module only after a random probe through both agrees to float
precision (a module that mixes tokens, that the record does not describe, or that carries the user's hooks stays
as recorded). The layer readouts'
reconstruction self-check then covers the whole sweep, as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    """How the stand-ins run within `composed`: each module of `restricted` keeps autograd to its output at
    `gradient_token` (the VJPs of an output read at one token need no other, where `own_token_modules` shows it);
    `noisy` (module, token) adds a seeded random vector to that module's output at every other token (the probe)."""

    gradient_token: int | None = None
    restricted: set = field(default_factory=set)
    noisy: tuple[nn.Module, int] | None = None
    noise_added: bool = False  # the probed module ran as a stand-in and took the noise (else the probe proves nothing)

    def token_of(self, module: nn.Module, start: int) -> int | None:
        """The token within the replay's window (from `start`) whose output of `module` carries the gradient."""
        return None if self.gradient_token is None or module not in self.restricted else self.gradient_token - start

    def noise_for(self, module: nn.Module, out: torch.Tensor, start: int) -> torch.Tensor:
        """`out`, plus the probe's noise at every token but the probed one where `module` is probed."""
        if self.noisy is None or self.noisy[0] is not module:
            return out
        # as large as the output itself (and at least 1): a cross-token coefficient is not rounded away
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        noise[:, self.noisy[1] - start] = 0
        self.noise_added = True
        return out + noise.to(out.device) * (1 + out.detach().abs().amax())


def linear_stand_ins(lin: OpLinearization, layers: Sequence[nn.Module], maps: dict) -> list[nn.Linear]:
    """The plain `nn.Linear` modules of `layers` that a replay computes (their one recorded op, a plain linear, is
    needed), outside the composed modules of `maps` and without a forward of their own on the instance (a wrapper
    the record ran through): each may keep its gradient to one token (`composed`), where a probe allows."""
    paths = {module: path for path, module in lin.model.named_modules()}
    inside = {id(sub) for module in maps for sub in module.modules()}

    def recorded_linear(m: nn.Module) -> bool:
        entry = lin.entries.get((paths.get(m), 0))
        return (lin.counts.get(paths.get(m)) == 1 and (paths[m], 0) in lin.needed and entry.name == "linear"
                and entry.kind == "plain")

    return [m for layer in layers for m in layer.modules()
            if type(m) is nn.Linear and id(m) not in inside and "forward" not in m.__dict__ and recorded_linear(m)]


@contextmanager
def composed(lin: OpLinearization, maps: dict[nn.Module, torch.Tensor],
             linears: Sequence[nn.Linear] = ()) -> Iterator[StandIn]:
    """Within: each module of `maps` runs as its composed map on a replay's token window (tokens lin.start…),
    outside lllm's interceptor (the ops it would see are not the recorded ones); each of `linears` runs through the
    interceptor as recorded unless the StandIn restricts its gradient to one token or probes it, then outside the
    interceptor (its one op, F.linear(h, weight, bias), is the recorded one; `linear_stand_ins` checks that). Restored
    on exit."""
    stand_in = StandIn()

    def map_forward(module: nn.Module, maps_of_module: torch.Tensor):
        def forward(hidden, *args, **kwargs):
            with lin.bypassed():
                window = maps_of_module[lin.start : lin.start + hidden.shape[1]]  # (W, d_out, d_in)
                if hidden.dim() != 3 or window.shape[0] != hidden.shape[1]:
                    raise ReplayError(f"a composed MLP got hidden states of shape {tuple(hidden.shape)} in the "
                                      f"token window {lin.start}…: not the (B, W, d) of a replay of its record")
                out = apply_maps(hidden, window, stand_in.token_of(module, lin.start))
                out = stand_in.noise_for(module, out, lin.start)
            lin.tags[out] = L
            return out
        return forward

    def linear_forward(module: nn.Linear):
        def forward(*args, **kwargs):
            hidden = args[0] if len(args) == 1 and not kwargs else kwargs.get("input") if not args else None
            token = stand_in.token_of(module, lin.start)
            probed = stand_in.noisy is not None and stand_in.noisy[0] is module
            if ((token is None and not probed) or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3
                    or hidden.dtype != module.weight.dtype):  # not the (B, W, d) of a replay: as recorded
                return nn.Linear.forward(module, *args, **kwargs)  # through the interceptor
            with lin.bypassed():
                out = one_token_gradient(lambda h: nn.functional.linear(h, module.weight, module.bias), hidden, token)
                out = stand_in.noise_for(module, out, lin.start)
            lin.tags[out] = L
            return out
        return forward

    forwards = {**{m: map_forward(m, maps_of_m) for m, maps_of_m in maps.items()},
                **{m: linear_forward(m) for m in linears}}
    saved = {module: module.__dict__.get("forward") for module in forwards}  # an instance's own forward (a wrapper)
    for module, forward in forwards.items():
        module.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield stand_in
    finally:
        for module, own in saved.items():
            if own is None:
                del module.forward
            else:
                module.forward = own


def one_token_gradient(product, hidden: torch.Tensor, token: int | None) -> torch.Tensor:
    """product(hidden) for hidden (B, W, d_in), under autograd only through token `token`'s rows (the other tokens
    computed as constants): a VJP of an output read at that token then pays for one row of products in W."""
    if token is None or not torch.is_grad_enabled():
        return product(hidden)
    with torch.no_grad():
        before, after = product(hidden[:, :token]), product(hidden[:, token + 1:])
    return torch.cat([before, product(hidden[:, token:token + 1]), after], 1)


def own_token_modules(lin: OpLinearization, stand_in: StandIn, run, hidden: torch.Tensor, position: int,
                      candidates: Sequence[nn.Module]) -> set[nn.Module]:
    """The candidates whose output `run(hidden, position)` (a replayed layer, within `composed`) reads at `position`
    alone: its outputs are bit for bit the same when random vectors are added to the module's output at every other
    token. (No decoder mixes tokens after its MLP or its attention's output projection; a layer that did would keep
    their gradients at every token.)"""
    def replayed():
        lin.mark_live(hidden)
        with torch.no_grad(), lin.replay():
            return run(hidden, position)

    plain, own = replayed(), set()
    for module in candidates:
        stand_in.noisy, stand_in.noise_added = (module, position), False
        try:
            moved = replayed()
        finally:
            stand_in.noisy = None
        if stand_in.noise_added and all(torch.equal(plain[k], moved[k]) for k in plain):
            own.add(module)
    return own
