"""Linearize any decoder at the level of torch operations: freeze, audit, prove.

Inside `detached(model)` a `TorchFunctionMode` sees every torch function and Tensor method that
the modeling code calls, and tags each tensor by how it depends on the input embeddings x:

    C  constant in x: weights, masks, positions, rotary tables, eps
    F  depends on x but detached: a frozen factor (softmax weights, 1/rms) or a frozen decision (top-k)
    L  live, of degree 1 in (x, additive parameters): the linear stream
    A  live output of an elementwise activation f(h) = h·g(h), with g frozen
    N  non-linear in x (Q·Kᵀ, h + ε): may exist, but only ops that freeze it may consume it

With every nonlinear factor frozen the network is jointly homogeneous of degree 1 in (x, biases),
so y = Σᵢ J⁺ᵢxᵢ + c, with c the JVP over the additive parameters (biases and every embedding table
other than the token embedding, e.g. GPT-2's `wpe`). The rules (`OP_TABLE`) need no module names:

- ops whose inputs are all C/F run untouched; structural and reduction ops pass the tag through;
- products freeze N factors first, then A factors (gated MLP: act(gate).detach()·up, paper eq. 8);
  two plain L factors give N (Q·Kᵀ);
- additive ops are L only if op(live := 0) is zero, so x + ε is N while h + bias stays L;
- f(h) with f(0) = 0 (SiLU, GELU, ReLU, tanh, …) becomes h·g(h) with g frozen; other nonlinear ops
  (softmax, rsqrt, exp, sigmoid, topk, max, comparisons) give F; fused layer_norm/rms_norm keep the
  mean subtraction live and 1/std frozen; sdpa freezes P and keeps V live.

Every rewrite returns `value.detach() + (s − s.detach())`, `value` being the op's own result, so the
float32 forward is bit-for-bit unchanged. In float64 no x-dependent tensor is cast down (transformers
casts softmax and norms to float32): constants that meet float64 are cast up instead.

Audit: an op outside the table that sees a live tensor raises `CoverageError` naming the op, the
module path and the modeling-file line; any module in training mode, TorchScript or torch.compile is
refused; a tensor that depends on x but was produced where the mode could not see (a fused kernel, a
custom autograd.Function with its own backward) is caught because it requires grad without a tag.
Custom autograd Functions are run decomposed (their forward's torch ops under the mode). The engines
then check that y is tagged linear, and the numeric reconstruction self-check stays.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lllm.errors import CoverageError, LinearizationError, NumericalRangeError, ReplayError, UnsupportedModelError
from lllm.kernel.mode import LinearizingMode
from lllm.kernel.opargs import tensors_in
from lllm.kernel.optable import C, L, A, LIVE, MLP_SPLITS, TAG_MEANING
from lllm.validation import check_choice

@dataclass
class OpLinearization:
    """State of one `detached` context: tensor tags, the module stack, and what was frozen."""

    model: nn.Module
    mlp_split: str = "activation"
    tags: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    frozen: Counter = field(default_factory=Counter)  # op name -> how often it was frozen
    splits: Counter = field(default_factory=Counter)  # which factor a product with two live factors froze
    stack: list = field(default_factory=list)  # module paths of the forwards under way
    additive: list = field(default_factory=list)  # (module, attribute name): biases and position tables
    float64: bool = False  # a float64 model: nothing is cast below float64
    device: torch.device = torch.device("cpu")  # the model's: what a skipped tensor's device reads as
    # Record/replay: a recorded forward keeps each live op's frozen values under (module path, n-th live op
    # there); a replayed forward applies them to other inputs (a batch of basis vectors), skipping every op
    # that only feeds frozen values (Q, K, RoPE, the scores, the activation's branch), so the network is one
    # fixed linear map. start/stop cut the token axes of the replayed values (the causal token window).
    record: bool = False
    replaying: bool = False
    start: int = 0
    stop: int | None = None
    entries: dict = field(default_factory=dict)  # key -> lllm.kernel.opargs.Entry
    counters: Counter = field(default_factory=Counter)  # module path -> live ops seen in this pass
    producer: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)  # tensor -> key of its op
    deps: dict = field(default_factory=dict)  # key -> keys whose outputs it reads live
    needed: set | None = None  # keys a replay must compute; the others run on the meta device
    inplace: set = field(default_factory=set)  # keys of in-place writes: always computed (views share storage)
    dead_results: dict = field(default_factory=dict)  # (key, input metadata) -> a dead op's result metadata
    dead_window: tuple | None = None  # the token window (start, stop) whose dead results are kept
    remember_dead: bool = False  # this pass remembers dead ops' shapes: more passes of its window follow
    counts: dict = field(default_factory=dict)  # module path -> live ops recorded there: a replay must match
    batch_safe: bool = True  # False when x-dependent indices select live rows (MoE): no batched replay
    bypass: bool = False  # ops run untouched (a composed map standing in for a replayed module)
    identity_input: torch.Tensor | None = None  # e_k at every token (B = d_in, T, d_in): a linear op on it is Wᵀ

    def tag(self, t) -> str:
        """The tag of tensor `t` (untracked tensors are constants)."""
        return self.tags.get(t, C) if isinstance(t, torch.Tensor) else C

    def mark_live(self, *tensors: torch.Tensor) -> None:
        """Declare tensors as live inputs (x, or a layer's input hidden states)."""
        for t in tensors:
            self.tags[t] = L

    def check_linear(self, t: torch.Tensor, what: str) -> None:
        """Raise unless `t` is proven linear (affine with biases) in x, and finite (before any Jacobian work)."""
        if not bool(torch.isfinite(t.detach()).all()):
            raise NumericalRangeError(
                f"{what} holds inf or NaN in {t.dtype}: the model's activations overflow this dtype, so no "
                "Jacobian reproduces it (Gemma 3 in float16 does so); use float32, bfloat16 or float64"
            )
        tag = self.tag(t)
        if tag not in (L, A):
            raise CoverageError(
                f"{what} is tagged {tag!r} by lllm's op-level audit, not linear in the input embeddings "
                f"({TAG_MEANING[tag]}); the detached Jacobian would not reproduce it. Ops frozen: "
                f"{dict(self.frozen)}."
            )

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the frozen values of the forwards run inside (then call `finish_record`)."""
        self.entries.clear(), self.deps.clear(), self.counters.clear(), self.inplace.clear()
        self.dead_results.clear()
        self.producer, self.needed, self.record, self.batch_safe = WeakIdKeyDictionary(), None, True, True
        try:
            yield
        finally:
            self.record = False

    def finish_record(self, outputs) -> None:
        """Mark what a replay must compute: every op that `outputs` read live, back to the inputs."""
        frontier = [self.producer[t] for t in outputs if t in self.producer] + list(self.inplace)
        self.counts = dict(self.counters)
        needed: set = set()
        while frontier:
            key = frontier.pop()
            if key not in needed:
                needed.add(key)
                frontier.extend(self.deps.get(key, ()))
        self.needed = needed

    def recorded(self) -> Recording:
        """What the last recording froze, to replay in a later `detached` context of the same model."""
        if self.needed is None:
            raise LinearizationError("nothing is recorded; run a forward under recording() and finish_record()")
        return Recording(dict(self.entries), set(self.needed), self.batch_safe, dict(self.counts))

    def load(self, recording: Recording) -> None:
        """Replay `recording` (from `recorded()`) in this context."""
        self.entries, self.needed = dict(recording.entries), set(recording.needed)
        self.dead_results.clear()
        self.batch_safe, self.counts = recording.batch_safe, dict(recording.counts)

    @contextmanager
    def replay(self, start: int = 0, stop: int | None = None, remember_dead: bool = False) -> Iterator[None]:
        """One replayed pass: the recorded frozen values, their token axes cut to tokens start…stop-1.
        `remember_dead` where other passes of the same window follow (a forward sweep in chunks): they reuse the
        dead ops' shapes; a window replayed once would pay for the signatures and never read them (~1 s per
        SmolLM2 analysis)."""
        if self.needed is None:
            raise LinearizationError("nothing is recorded to replay; run a forward under recording() first")
        if (start, stop) != self.dead_window:  # a dead op's shapes hold for one token window: keep one window's
            self.dead_results.clear()
            self.dead_window = (start, stop)
        self.replaying, self.start, self.stop, self.remember_dead = True, start, stop, remember_dead
        self.counters.clear()
        try:
            yield
            for path, n in self.counters.items():  # a shared module, or a per-token loop, would shift the keys
                if n != self.counts.get(path):
                    raise ReplayError(f"module {path!r} ran {n} live ops in the replay, {self.counts.get(path)} when "
                                      "recorded: the replay does not follow the recorded forward")
        except RuntimeError as error:  # a recorded batch-1 value reshaped with the batch (Falcon's ALiBi scores)
            raise ReplayError(f"the recorded forward cannot be replayed on this batch ({error})") from error
        finally:
            self.replaying, self.start, self.stop, self.remember_dead = False, 0, None, False

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Ops inside run untouched and untagged: for code that stands in for a replayed module (see
        `lllm.kernel.positionwise`), whose ops are not the recorded ones; it tags its own output."""
        before, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = before

    @property
    def split(self) -> str:
        """Which factor the gated products froze: paper eq. 8 ('activation'), 'gate', or another split."""
        if not self.splits:
            return "none (no gated product)"
        return ", ".join(f"{k} ×{v}" for k, v in sorted(self.splits.items()))

    def report(self) -> dict:
        """What was frozen, for results' metadata and the supported-architectures page."""
        return {"frozen_ops": dict(sorted(self.frozen.items())), "split": self.split}


@dataclass(frozen=True)
class Recording:
    """The frozen values of one recorded forward: replayed, the model is one fixed linear (affine) map."""

    entries: dict
    needed: set
    batch_safe: bool
    counts: dict


# ---------------------------------------------------------------------------------------------
# The context: hooks that keep the module stack and tag the live inputs, the mode, and the audit.
# ---------------------------------------------------------------------------------------------


def additive_parameters(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, dotted name) of every additive parameter: biases and non-token embedding tables."""
    token_table = model.get_input_embeddings().weight
    found, seen = [], set()
    for path, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied parameter (lm_head.bias is lm_head.decoder.bias) is one parameter
                continue
            seen.add(id(p))
            if attr == "bias" or attr.endswith("_bias") and "correction" not in attr:
                found.append((module, attr, f"{path}.{attr}" if path else attr))
            elif isinstance(module, nn.Embedding) and attr == "weight" and p is not token_table:
                found.append((module, attr, f"{path}.{attr}" if path else attr))
    return found


def additive_duals(model: nn.Module, module: nn.Module) -> dict:
    """{name in `module`: dual tensor} for `model`'s additive parameters held by `module`, each with itself as its
    tangent: a forward through them (inside torch.autograd.forward_ad.dual_level) carries c as its tangent."""
    import torch.autograd.forward_ad as fwAD

    paths = {m: p for p, m in module.named_modules()}
    names = [f"{paths[m]}.{attr}" if paths[m] else attr for m, attr, _ in additive_parameters(model) if m in paths]
    params = dict(module.named_parameters(remove_duplicate=False))
    return {n: fwAD.make_dual(params[n].detach(), params[n].detach()) for n in names}


def audit_modules(model: nn.Module) -> None:
    """Refuse what the mode cannot see: training mode, TorchScript, torch.compile."""
    if type(model).__name__ == "OptimizedModule":
        raise UnsupportedModelError("the model is wrapped by torch.compile; pass the original module (model._orig_mod)")
    for path, module in model.named_modules():
        if module.training:
            raise UnsupportedModelError(
                f"module {path or '<root>'!r} ({type(module).__name__}) is in training mode (dropout and other training-only paths are random "
                "or differ from inference), so the Jacobian would not be that of the model in use; call model.eval() first"
            )
        if isinstance(module, torch.jit.ScriptModule):
            raise UnsupportedModelError(f"module {path!r} is TorchScript, whose ops lllm cannot see; use eager modules")


class _ForwardContext:
    """The `ctx` a custom Function's forward gets when lllm runs it decomposed: autograd sees its ops."""

    needs_input_grad = (True,) * 64

    def __getattr__(self, name):  # save_for_backward, mark_dirty, set_materialize_grads, ...
        return lambda *args, **kwargs: None


@contextmanager
def _decomposed_autograd_functions(lin: OpLinearization):
    """Run custom autograd Functions op by op under the mode when they see a live tensor: their own
    backward would give the ordinary derivative, not the detached one."""
    saved = torch.autograd.Function.__dict__["apply"]
    original = saved.__func__

    def apply(cls, *args, **kwargs):
        tensors = tensors_in(args, kwargs)
        if not (lin.stack and any(lin.tag(t) in LIVE for t in tensors)):
            return original(cls, *args, **kwargs)
        if torch.autograd.function._is_setup_context_defined(cls.setup_context):
            return cls.forward(*args, **kwargs)
        return cls.forward(_ForwardContext(), *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = saved


@contextmanager
def detached(model: nn.Module, *, mlp_split: str = "activation") -> Iterator[OpLinearization]:
    """Make `model` locally linear in its input embeddings at the op level until exit; restore it after."""
    check_choice(mlp_split, "mlp_split", MLP_SPLITS)
    if getattr(model, "_lllm_detached", False):
        raise UnsupportedModelError("model is already inside an lllm linearization; nesting is not supported")
    audit_modules(model)
    lin = OpLinearization(model=model, mlp_split=mlp_split, additive=additive_parameters(model),
                          float64=any(p.dtype == torch.float64 for p in model.parameters()),
                          device=next(model.parameters()).device)
    paths = {module: path for path, module in model.named_modules()}
    handles, grads = [], [(p, p.requires_grad) for p in model.parameters()]

    def pre(module, args, kwargs):
        if not lin.stack:  # the outermost forward: tag its live inputs and the additive parameters
            for m, attr, _ in lin.additive:
                lin.tags[getattr(m, attr)] = L
            embeds = kwargs.get("inputs_embeds")
            for t in tensors_in(args, kwargs):
                if (t is embeds or t.requires_grad) and t not in lin.tags:  # an N readout stays N
                    lin.tags[t] = L
        lin.stack.append(paths.get(module, "?"))

    def post(module, args, kwargs, output):
        if lin.stack:
            lin.stack.pop()

    for module in paths:
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    model._lllm_detached = True
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with _decomposed_autograd_functions(lin), LinearizingMode(lin):
            yield lin
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in grads:
            p.requires_grad_(flag)
        model.__dict__.pop("_lllm_detached", None)
