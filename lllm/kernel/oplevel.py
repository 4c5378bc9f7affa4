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

import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

from lllm.errors import CoverageError, LinearizationError, ReplayError, UnsupportedModelError
from lllm.validation import check_choice

C, F, L, A, N = "C", "F", "L", "A", "N"
LIVE = (L, A, N)
MLP_SPLITS = ("activation", "gate")

# Structural, reduction and cast ops: linear in their first tensor argument, which keeps its tag.
PASS = {
    "view", "reshape", "view_as", "reshape_as", "transpose", "transpose_", "permute", "contiguous", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "repeat_interleave", "narrow",
    "select", "__getitem__", "chunk", "split", "split_with_sizes", "unbind", "tensor_split", "clone", "mean",
    "sum", "flip", "roll", "movedim", "moveaxis", "t", "T", "mT", "diagonal", "index_select", "gather",
    "take_along_dim", "neg", "__neg__", "negative", "positive", "cumsum", "dropout", "unfold", "tril", "triu",
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "squeeze_", "unsqueeze_",
    "embedding", "masked_select", "swapaxes", "swapdims", "view_as_complex", "view_as_real",
}
CASTS = {"to", "type", "type_as", "float", "double", "half", "bfloat16"}
# Products: the argument positions (or keywords) that are factors; the rest (linear's bias) are additive.
_BINARY = ((0, 1), ("input", "other"))
PRODUCTS = {
    **dict.fromkeys(("mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply", "matmul", "__matmul__",
                     "__rmatmul__", "outer", "div", "__truediv__", "div_", "__itruediv__", "true_divide"), _BINARY),
    "bmm": ((0, 1), ("input", "mat2")), "mm": ((0, 1), ("input", "mat2")),
    "linear": ((0, 1), ("input", "weight")), "addmm": ((1, 2), ("mat1", "mat2")),
    "baddbmm": ((1, 2), ("batch1", "batch2")), "einsum": None, "conv1d": ((0, 1), ("input", "weight")), "_grouped_mm": ((0, 1), ("mat_a", "mat_b")),
}
# Ops on a live tensor that only read its shape, dtype or device: the result is constant.
CONSTRUCTORS = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
                "new_full", "new_tensor", "rand_like", "randn_like"}
ELEMENTWISE_PRODUCTS = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply", "div", "__truediv__",
                        "div_", "__itruediv__", "true_divide"}
DIVISIONS = {"div", "__truediv__", "div_", "__itruediv__", "true_divide"}
# Additive ops: L when op(live := 0) is zero, else N.
ADDITIVE = {
    "add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_", "__isub__",
    "rsub", "subtract", "cat", "concat", "concatenate", "stack", "where", "masked_fill", "masked_fill_",
    "index_add", "index_add_", "scatter_add", "scatter_add_", "scatter", "index_put", "index_put_",
    "__setitem__", "copy_", "pad", "index_copy", "index_copy_", "masked_scatter",
}
# Elementwise f with f(0) = 0, rewritten h·g(h) with g frozen. Value: the factor g as a function of (h, value).
ACTIVATIONS = {"relu", "silu", "gelu", "tanh", "sin", "erf", "sinh", "asinh", "atan", "arctan", "leaky_relu",
               "elu", "selu", "celu", "relu6", "hardswish", "mish", "softsign", "abs", "clamp", "clip",
               "hardtanh", "pow", "__pow__", "square", "hardshrink", "softshrink", "tanhshrink", "threshold"}
# Nonlinear ops that freeze their input: the result is F (detached).
FREEZING = {
    "softmax", "log_softmax", "_softmax", "exp", "exp2", "log", "log2", "log10", "log1p", "expm1", "rsqrt",
    "sqrt", "reciprocal", "sigmoid", "softplus", "topk", "sort", "argsort", "max", "min", "amax", "amin",
    "argmax", "argmin", "logsumexp", "std", "var", "var_mean", "std_mean", "norm", "vector_norm",
    "linalg_vector_norm", "sign", "floor", "ceil", "round", "trunc", "gt", "lt", "ge", "le", "eq", "ne",
    "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__", "greater", "less", "isnan", "isinf",
    "isfinite", "all", "any", "nonzero", "argwhere", "cos", "cosh", "__rtruediv__", "__rpow__", "detach",
    "logical_not", "logical_and", "logical_or", "bool", "long", "int", "one_hot", "maximum", "minimum",
    "data", "cumprod", "prod", "sgn", "signbit", "__and__", "__or__", "__invert__", "floor_divide",
}
# Metadata of a tensor: answered directly (a replay's skipped tensors are on the meta device: their shape and
# dtype are the real ones, their device is replaced by the model's).
METADATA = {"shape", "dtype", "device", "size", "dim", "ndim", "ndimension", "numel", "nelement", "requires_grad",
            "is_floating_point", "is_complex", "stride", "is_contiguous", "element_size", "is_cuda", "is_meta",
            "get_device", "layout", "is_leaf", "grad_fn", "__len__", "data_ptr"}
# Elementwise ops whose result's shape is the broadcast of their tensor inputs' (fast shapes for skipped ops).
ELEMENTWISE = {"add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "rsub", "mul", "__mul__", "__rmul__",
               "div", "__truediv__", "__rtruediv__", "neg", "__neg__", "pow", "__pow__", "silu", "gelu", "relu", "tanh",
               "sigmoid", "rsqrt", "sqrt", "exp", "sin", "cos", "clamp", "abs", "square", "reciprocal", "where",
               "masked_fill", "to", "float", "type_as", "contiguous", "clone", "dropout"}
SHAPE_PRESERVING_FREEZES = {"rsqrt", "sqrt", "exp", "softmax", "log_softmax", "sigmoid", "reciprocal", "softplus",
                            "cos", "detach", "sign", "gt", "lt", "ge", "le", "eq", "ne"}
# Always passed through, whatever they see: autograd's own entry points and pure metadata.
PASSTHROUGH = {"grad", "backward", "_backward_hooks", "register_hook", "retain_grad", "requires_grad_"}
# f'(0) for activations rewritten by the generic where(h ≠ 0, f(h)/h, f'(0)).
SLOPE_AT_ZERO = {"relu": 0.5, "leaky_relu": 1.0, "elu": 1.0, "selu": 1.0507009873554805, "celu": 1.0,
                 "relu6": 0.5, "hardswish": 0.5, "mish": 0.6, "softsign": 1.0, "abs": 0.0, "sin": 1.0,
                 "tanh": 1.0, "erf": 2 / math.sqrt(math.pi), "sinh": 1.0, "asinh": 1.0, "atan": 1.0,
                 "arctan": 1.0, "clamp": 1.0, "clip": 1.0, "hardtanh": 1.0, "hardshrink": 0.0,
                 "softshrink": 0.0, "tanhshrink": 0.0, "threshold": 0.0, "pow": 0.0, "__pow__": 0.0,
                 "square": 0.0}
_LLLM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the lllm package
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


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
    entries: dict = field(default_factory=dict)  # key -> _Entry
    counters: Counter = field(default_factory=Counter)  # module path -> live ops seen in this pass
    producer: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)  # tensor -> key of its op
    deps: dict = field(default_factory=dict)  # key -> keys whose outputs it reads live
    needed: set | None = None  # keys a replay must compute; the others run on the meta device
    inplace: set = field(default_factory=set)  # keys of in-place writes: always computed (views share storage)
    counts: dict = field(default_factory=dict)  # module path -> live ops recorded there: a replay must match
    batch_safe: bool = True  # False when x-dependent indices select live rows (MoE): no batched replay

    def tag(self, t) -> str:
        """The tag of tensor `t` (untracked tensors are constants)."""
        return self.tags.get(t, C) if isinstance(t, torch.Tensor) else C

    def mark_live(self, *tensors: torch.Tensor) -> None:
        """Declare tensors as live inputs (x, or a layer's input hidden states)."""
        for t in tensors:
            self.tags[t] = L

    def check_linear(self, t: torch.Tensor, what: str) -> None:
        """Raise unless `t` is proven linear (affine with biases) in x."""
        tag = self.tag(t)
        if tag not in (L, A):
            raise CoverageError(
                f"{what} is tagged {tag!r} by lllm's op-level audit, not linear in the input embeddings "
                f"({_TAG_MEANING[tag]}); the detached Jacobian would not reproduce it. Ops frozen: "
                f"{dict(self.frozen)}."
            )

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the frozen values of the forwards run inside (then call `finish_record`)."""
        self.entries.clear(), self.deps.clear(), self.counters.clear(), self.inplace.clear()
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
        self.batch_safe, self.counts = recording.batch_safe, dict(recording.counts)

    @contextmanager
    def replay(self, start: int = 0, stop: int | None = None) -> Iterator[None]:
        """One replayed pass: the recorded frozen values, their token axes cut to tokens start…stop-1."""
        if self.needed is None:
            raise LinearizationError("nothing is recorded to replay; run a forward under recording() first")
        self.replaying, self.start, self.stop = True, start, stop
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
            self.replaying, self.start, self.stop = False, 0, None

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


_TAG_MEANING = {C: "constant", F: "a frozen, detached quantity", L: "linear", A: "linear",
                N: "non-linear in x: a nonlinearity reached it without being frozen"}


def _name(func) -> str:
    """The op's name; a property getter is named after its property (Tensor.T -> 'T'). A torch.ops overload
    (aten.mean.dim) keeps its whole name, so that no table entry matches it: on a live tensor it is refused."""
    if type(func).__name__ in ("OpOverload", "OpOverloadPacket"):
        return f"torch.ops.{func}"
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.rsplit(".", 1)[-1]


def _caller() -> str:
    """file:line of the innermost frame outside torch and lllm: the modeling code that called the op."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_TORCH_DIR) or path.startswith(_LLLM_DIR)):
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "<unknown>"


def _tensors(*objs) -> list:
    """The tensors in args/kwargs/results, looking one level into lists, tuples and dicts (what torch ops take)."""
    found = []
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                if isinstance(item, torch.Tensor):
                    found.append(item)
                elif isinstance(item, (list, tuple, dict)):
                    found.extend(_tensors(item))
        elif isinstance(obj, dict):
            found.extend(_tensors(list(obj.values())))
    return found


def _map_tensors(fn, obj):
    """obj with fn applied to every tensor, one level into lists, tuples and dicts (what torch ops take)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map_tensors(fn, item) for item in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    return obj


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_meta else t.to("meta")


def _surrogate(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """`value` as a tensor whose derivative is that of `live`: the forward stays bit-for-bit value."""
    return value.detach() + (live - live.detach())


def _zeros_for_live(lin: OpLinearization, obj):
    """`obj` with every live tensor replaced by zeros: the constant part of an additive op."""
    return tree_map(lambda t: torch.zeros_like(t.detach()) if lin.tag(t) in LIVE else _plain(t), obj)


def _plain(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _nonzero(result) -> bool:
    tensors = _tensors(result)
    return any(bool(t.detach().ne(0).any()) for t in tensors if t.numel())


class _Mode(TorchFunctionMode):
    """The interceptor: tags every result, rewrites nonlinear ops on live tensors, refuses unknown ones."""

    def __init__(self, lin: OpLinearization):
        super().__init__()
        self.lin = lin

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        lin, name = self.lin, _name(func)
        if name in METADATA:  # a shape, dtype or device: no value flows, nothing to tag or key
            result = func(*args, **kwargs)
            return lin.device if isinstance(result, torch.device) and result.type == "meta" else result
        if not lin.stack or name in PASSTHROUGH:  # outside the model's forwards: engine code
            result = func(*args, **kwargs)
            if name in PASS and lin.tag(args[0] if args else None) in LIVE:
                self._tag(result, lin.tag(args[0]))  # y = out[0, position] keeps its tag
                if args[0] in lin.producer:  # and its producer, for what a replay must compute
                    for t in _tensors(result):
                        lin.producer[t] = lin.producer[args[0]]
            return result
        tensors = _tensors(args, kwargs)
        tags = [self._checked_tag(t, name) for t in tensors]
        live = [t for t, tag in zip(tensors, tags) if tag in LIVE]
        wide = self._float64(tensors, tags)
        if lin.float64 and name in CASTS and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            wide = True  # a float64 weight cast down (Gemma's weight.float()) would round what meets x
        if wide and name in CASTS:
            return self._keep_float64(func, args, kwargs)
        if wide:
            args, kwargs = self._upcast(args, kwargs)
        if not live:  # constants and frozen values only: run untouched, whatever the op is
            result = func(*args, **kwargs)
            if lin.record:  # what it reads from frozen values must be computed by a replay too
                self._record_frozen_only(tensors, result)
            return self._tag(result, F if F in tags else C)
        key = None
        if lin.record or lin.replaying:  # a live op: the n-th in its module, in record and replay alike
            path = lin.stack[-1]
            key, lin.counters[path] = (path, lin.counters[path]), lin.counters[path] + 1
        if lin.replaying:
            replayed = self._replay(func, args, kwargs, name, key, tensors)
            if replayed is not _RUN:
                return replayed
        self.pending = None
        result = self._dispatch(func, args, kwargs, name, tags, wide)
        if lin.record:
            self._record(key, name, tensors, args, result)
        return result

    def _dispatch(self, func, args, kwargs, name, tags, wide):
        """Apply the op table to an op that sees a live tensor."""
        lin = self.lin
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        inplace = base != name or name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")
        if name in CONSTRUCTORS:
            return self._tag(func(*args, **kwargs), C)
        if name in PASS or base in PASS:
            return self._pass(func, args, kwargs, name)
        if name in PRODUCTS:
            return self._product(func, args, kwargs, name)
        if name in ADDITIVE or base in ADDITIVE:
            return self._additive(func, args, kwargs, name)
        if name == "scaled_dot_product_attention":
            return self._sdpa(func, args, kwargs)
        if name in ("layer_norm", "rms_norm"):
            return self._norm(func, args, kwargs, name)
        if base in ACTIVATIONS or name in ACTIVATIONS:
            if inplace:
                self._refuse(name, "an in-place nonlinear op rewrites a live tensor that autograd has saved")
            return self._activation(func, args, kwargs, base)
        if name in FREEZING or base in FREEZING:
            if inplace and lin.tag(args[0]) in LIVE:
                self._refuse(name, "an in-place nonlinear op rewrites a live tensor that autograd has saved")
            if name in ("softmax", "log_softmax", "_softmax") and wide and kwargs.get("dtype") is not None:
                kwargs = {**kwargs, "dtype": torch.float64}
            return self._frozen_result(func, args, kwargs, name)
        result = func(*args, **kwargs)
        if not _tensors(result):
            return result  # .item(), bool(), size(): a frozen decision or metadata
        self._refuse(name, "it is not in lllm's op table")

    # -- record and replay -------------------------------------------------------------------------

    def _note(self, kind: str, values: dict, tag: str | None = None, exclude=()) -> None:
        """What a rule froze for this op, kept when recording: how to replay it, and which inputs it froze."""
        if self.lin.record:
            self.pending = {"kind": kind, "values": values, "tag": tag, "exclude": {id(t) for t in exclude}}

    def _record(self, key, name: str, tensors, args, result) -> None:
        lin, pending = self.lin, self.pending or {"kind": "plain", "values": {}, "tag": None, "exclude": set()}
        tag = pending["tag"]
        if pending["kind"] == "plain" and isinstance(result, torch.Tensor) and result is not args[0]:
            tag = lin.tags.get(result)  # a replay runs it as it is and tags it so: the table is read once
        lin.entries[key] = _Entry(name, pending["kind"], pending["values"], tag)
        if target_written(name, args):
            lin.inplace.add(key)
        lin.deps[key] = {lin.producer[t] for t in tensors if id(t) not in pending["exclude"] and t in lin.producer}
        for t in _tensors(result):
            lin.producer[t] = key
        target = args[0] if target_written(name, args) else None
        if target is not None:
            while target is not None:  # an in-place write: the target (and what it views) now comes from here
                lin.producer[target] = key
                target = target._base

    def _record_frozen_only(self, tensors, result) -> None:
        """An op on constants and frozen values: not replayed as such, but the keys it reads stay needed."""
        lin = self.lin
        sources = {lin.producer[t] for t in tensors if t in lin.producer}
        if sources:
            key = ("~", len(lin.deps))
            lin.deps[key] = sources
            for t in _tensors(result):
                lin.producer[t] = key

    def _replay(self, func, args, kwargs, name, key, tensors):
        try:
            return self._replay_op(func, args, kwargs, name, key, tensors)
        except RuntimeError as error:  # a recorded value that does not broadcast to the batch (flattened tokens)
            raise ReplayError(f"op {name!r} of {key[0]!r} cannot be replayed on this batch ({error})") from error

    def _replay_op(self, func, args, kwargs, name, key, tensors):
        """The recorded op at `key` applied to this pass's inputs; _RUN when it is linear and simply runs."""
        lin = self.lin
        entry = lin.entries.get(key)
        if entry is None or entry.name != name:
            raise ReplayError(
                f"the replayed forward diverged from the recorded one at op {key[1]} of module {key[0]!r}: recorded "
                f"{entry.name if entry else 'nothing'!r}, now {name!r}; use the reverse method for this model")
        if key not in lin.needed:  # it only feeds frozen values: shapes are enough
            return self._dead(func, args, kwargs)
        kind, values = entry.kind, entry.values
        if kind == "plain" and any(t.is_meta for t in tensors):  # frozen kinds read only their live inputs
            raise ReplayError(f"op {name!r} of {key[0]!r} needs a value the replay skipped: a frozen value was "
                                     "recorded on a path the analysis missed; use the reverse method")
        if kind == "frozen":
            if name in SHAPE_PRESERVING_FREEZES and tensors and isinstance(values["out"], torch.Tensor):
                shape = torch.broadcast_shapes(*(t.shape for t in tensors))  # the result's shape, inputs broadcast
                return self._tag(self._narrowed(values["out"], shape), F)
            shapes = self._dead(func, args, kwargs)
            out = tree_map(lambda v, m: self._narrowed(v, m.shape) if isinstance(v, torch.Tensor) else v,
                           values["out"], shapes)
            return self._tag(out, F)
        if kind == "activation":
            h = args[0]
            return self._tag(h * self._narrowed(values["g"], h.shape), A)
        if kind == "norm":
            h, _, weight, bias, _ = _norm_arguments(values["name"], args, kwargs)
            inv = self._narrowed(values["inv"], h.shape)
            live = (h - h.mean(values["dims"], keepdim=True)) * inv if values["center"] else h * inv
            live = live if weight is None else live * weight
            return self._tag(live if bias is None else live + bias, entry.tag)
        if kind == "sdpa":
            bound = _sdpa_arguments(args, kwargs)
            q, k, v = bound["query"], bound["key"], bound["value"]
            probs = self._narrowed(values["P"], (*q.shape[:-1], k.shape[-2]))
            if v.shape[-3] != probs.shape[-3]:
                v = v.repeat_interleave(probs.shape[-3] // v.shape[-3], -3)
            return self._tag(probs.to(v.dtype) @ v, L)
        if kind == "substitute":
            args, kwargs = _mutable(args, kwargs)
            for slot, value in values.items():
                _put(args, kwargs, slot, self._narrowed(value, _get(args, kwargs, slot).shape))
            return self._tag(func(*args, **kwargs), entry.tag)
        if entry.tag is not None:  # linear in its live inputs, out of place: run it, tag as recorded
            return self._tag(func(*args, **kwargs), entry.tag)
        return _RUN

    def _narrowed(self, value: torch.Tensor, shape) -> torch.Tensor:
        """A recorded value cut to this replay's token window (see _narrow), or a ReplayError where an axis
        would shrink to anything but the window (tokens flattened with the batch, as OPT's MLP does)."""
        lin = self.lin
        window = None if lin.stop is None else lin.stop - lin.start
        for axis in range(-1, -min(value.dim(), len(shape)) - 1, -1):
            if value.shape[axis] > shape[axis] and shape[axis] != window:
                raise ReplayError(f"a recorded value of shape {tuple(value.shape)} does not fit a replayed shape "
                                  f"{tuple(shape)} (token window {window}): tokens are flattened with the batch")
        return _narrow(value, shape, lin.start)

    def _dead(self, func, args, kwargs):
        """The op on the meta device: its result's shape and dtype without its arithmetic. Metadata (a shape, a
        dtype) is the same as the real one; a device is the model's, so that what is made from it is real."""
        name = _name(func)
        tensors = _tensors(args, kwargs) if name in ELEMENTWISE else ()
        if tensors and name not in ("to", "float", "type_as") and all(t.dim() for t in tensors):
            dtype = tensors[0].dtype  # float tensors of one dtype here; python scalars do not widen them
            for t in tensors[1:]:
                dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else dtype
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
            return self._tag(torch.empty(shape, dtype=dtype, device="meta"), N)
        if name == "linear":
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            return self._tag(torch.empty((*args[0].shape[:-1], weight.shape[0]), dtype=args[0].dtype, device="meta"), N)
        result = func(*_map_tensors(_meta, args), **_map_tensors(_meta, kwargs))
        if isinstance(result, torch.device) and result.type == "meta":
            return self.lin.device
        return self._tag(result, N)

    def _note_indices(self, tensors) -> None:
        """x-dependent integer indices selecting live rows (MoE routing) tie the replay to batch 1."""
        if any(not t.is_floating_point() and self.lin.tag(t) == F for t in tensors):
            self.lin.batch_safe = False

    # -- bookkeeping -----------------------------------------------------------------------------

    def _checked_tag(self, t: torch.Tensor, name: str) -> str:
        tag = self.lin.tags.get(t)
        if tag is None:
            if t.requires_grad:  # depends on x, yet no op the mode saw produced it
                self._refuse(name, "its input depends on x but was produced outside lllm's view (a custom autograd "
                             "Function, a fused or compiled kernel, or a tensor captured from outside the forward)")
            return C
        return tag

    def _tag(self, result, tag: str):
        if isinstance(result, torch.Tensor):
            self.lin.tags[result] = tag
            return result
        for t in _tensors(result):
            self.lin.tags[t] = tag
        return result

    def _refuse(self, name: str, why: str):
        path = self.lin.stack[-1] if self.lin.stack else "<root>"
        raise CoverageError(
            f"op {name!r} in module {path or '<root>'!r} at {_caller()} sees a tensor that depends on the input "
            f"embeddings, and {why}. lllm cannot prove the detached Jacobian exact there, so it refuses rather "
            "than return a silently wrong number."
        )

    def _float64(self, tensors, tags) -> bool:
        """True when an x-dependent input is float64: then nothing x-dependent is cast down."""
        return any(t.dtype == torch.float64 for t, tag in zip(tensors, tags) if tag != C)

    def _upcast(self, args, kwargs):
        def up(t):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                wide = t.to(torch.float64)
                self.lin.tags[wide] = self.lin.tag(t)
                return wide
            return t
        return tree_map(up, args), tree_map(up, kwargs)

    def _keep_float64(self, func, args, kwargs):
        """A cast of a float64 x-dependent tensor: refuse to narrow it, keep float64."""
        lin, source = self.lin, args[0]
        if source.is_meta:  # skipped by a replay: its cast is skipped too, on the meta device
            args, kwargs = _map_tensors(_meta, args), _map_tensors(_meta, kwargs)
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.is_floating_point() and result.dtype != torch.float64:
            result = source.clone()  # a cast makes a new tensor: an in-place write to it must not reach the source
        lin.tags[result] = lin.tag(source)
        if lin.record and source in lin.producer:  # the cast is not a keyed op: what it reads stays needed
            lin.producer[result] = lin.producer[source]
        return result

    # -- rules -----------------------------------------------------------------------------------

    def _pass(self, func, args, kwargs, name):
        lin = self.lin
        source = args[0] if args else next(iter(kwargs.values()))
        others = [t for t in _tensors(args[1:], kwargs) if t is not source]
        if name == "embedding":  # F.embedding(ids, weight): linear in the table, ids must be constant
            source, others = args[1], [args[0]]
        if name in CASTS or name.endswith("_as"):  # type_as(other), view_as(other): other gives only dtype/shape
            others = []
        if any(lin.tag(t) in LIVE for t in others):
            self._refuse(name, "a live tensor reaches an argument in which the op is not linear")
        if name == "dropout" and (kwargs.get("training", args[2] if len(args) > 2 else False)):
            self._refuse(name, "dropout in training mode is random")
        self._note_indices(others)
        result = func(*args, **kwargs)
        if name == "detach":
            self._note("frozen", {"out": result}, exclude=[source])
            return self._tag(result, F)
        return self._tag(result, lin.tag(source))

    def _product(self, func, args, kwargs, name):
        lin = self.lin
        args, kwargs = _mutable(args, kwargs)
        if name == "einsum":  # einsum(eq, *operands) or einsum(eq, [operands])
            n = len(args[1]) if len(args) == 2 and isinstance(args[1], list) else len(args) - 1
            slots = [("e", i) for i in range(n)]
        else:
            positions, keys = PRODUCTS[name]
            slots = [("a", i) for i in positions if i < len(args)] + [("k", k) for k in keys if k in kwargs]
        factors = [s for s in slots if lin.tag(_get(args, kwargs, s)) in LIVE]
        tags = {s: lin.tag(_get(args, kwargs, s)) for s in factors}
        frozen: dict = {}

        def freeze(slot):
            operand = _get(args, kwargs, slot)
            frozen[slot] = (operand, operand.detach())
            _put(args, kwargs, slot, frozen[slot][1])
            factors.remove(slot)

        if name in DIVISIONS and len(slots) > 1 and slots[1] in factors:  # a live denominator: a reciprocal
            freeze(slots[1])
            lin.frozen["reciprocal"] += 1
        if len(factors) >= 2:
            for kind in (N, A if lin.mlp_split == "activation" else L):
                for s in [s for s in factors if tags[s] == kind]:
                    if len(factors) < 2:
                        break
                    freeze(s)
                    lin.splits[_split_name(kind, tags[factors[0]])] += 1
        if len(factors) >= 2:
            tag = N  # two live factors: Q·Kᵀ
        elif not factors:
            tag = F
        elif name not in ELEMENTWISE_PRODUCTS:
            tag = L if tags[factors[0]] in (L, A) else tags[factors[0]]
        else:  # h·g(h) with g frozen, such as x·tanh(x) written out: an activation's output
            tag = A if frozen and tags[factors[0]] in (L, A) else tags[factors[0]]
        if name in ("linear", "addmm", "baddbmm", "conv1d"):
            tag, result = self._with_additive(func, args, kwargs, name, tag)
        else:
            result = func(*args, **kwargs)
        if frozen:
            self._note("substitute", {s: v for s, (_, v) in frozen.items()}, tag, exclude=[o for o, _ in frozen.values()])
        return self._tag(result, tag)

    def _with_additive(self, func, args, kwargs, name, product_tag):
        """linear/conv1d/addmm/baddbmm: a product plus an additive term (bias, or addmm's and baddbmm's input)."""
        lin = self.lin
        index = 2 if name in ("linear", "conv1d") else 0
        extra = args[index] if len(args) > index else kwargs.get("bias" if name in ("linear", "conv1d") else "input")
        result = func(*args, **kwargs)
        extra_tag = lin.tag(extra)
        if N in (product_tag, extra_tag):
            tag = N
        elif extra_tag in (C, F) and extra is not None and _nonzero(extra):
            tag = N if product_tag in (L, A) else F
        elif extra_tag in (L, A) and product_tag == F:
            tag = N  # an x-dependent product beside a bias: not homogeneous
        else:
            tag = L if (L in (product_tag, extra_tag) or A in (product_tag, extra_tag)) else product_tag
        return tag, result

    def _additive(self, func, args, kwargs, name):
        lin = self.lin
        if name == "where" and len(args) == 1:  # where(cond): the indices of a frozen decision
            result = tree_map(_plain, func(*args, **kwargs))
            self._note("frozen", {"out": result}, exclude=_tensors(args, kwargs))
            return self._tag(result, F)
        if name == "where" and lin.tag(args[0]) in LIVE:  # a live condition is a frozen decision
            condition = args[0]
            args = (condition.detach(), *args[1:])
            self._note("substitute", {("a", 0): args[0]}, None, exclude=[condition])
        if name in ("masked_fill", "masked_fill_") and lin.tag(args[1]) in LIVE:
            self._refuse(name, "the mask depends on x")
        tensors = _tensors(args, kwargs)
        self._note_indices(tensors)
        tags = {lin.tag(t) for t in tensors}
        inplace = name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))
        if N in tags:
            tag = N
        elif name in ("__setitem__", "copy_"):
            tag = L  # an overwrite: the written value is live, the rest is checked where it is read
        else:  # the constant part: the op with every live input replaced by zeros
            plain = name[3:-2] if name.startswith("__i") else name[:-1]
            outplace = getattr(torch, plain, None) if inplace else func
            if outplace is None:
                self._refuse(name, "lllm has no out-of-place form to check its constant part")
            constant = outplace(*_zeros_for_live(lin, args), **_zeros_for_live(lin, kwargs))
            tag = N if _nonzero(constant) else L
        if self.pending is not None:
            self.pending["tag"] = tag
        result = func(*args, **kwargs)
        if inplace:
            target = args[0]
            keeps_rest = name == "__setitem__" and lin.tag(target) == N  # the unwritten part stays non-linear
            self._retag_inplace(target, N if keeps_rest else tag)
            return result
        return self._tag(result, tag)

    def _retag_inplace(self, target: torch.Tensor, tag: str):
        """An in-place write changed `target` (and the tensor it views)."""
        while target is not None:
            self.lin.tags[target] = tag
            target = target._base

    def _activation(self, func, args, kwargs, name):
        lin = self.lin
        h = args[0]
        if name in ("pow", "__pow__"):
            exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
            if isinstance(exponent, torch.Tensor) or exponent < 1:
                return self._frozen_result(func, args, kwargs, name)
        if name in ("clamp", "clip", "hardtanh", "threshold") and not _keeps_zero(name, args, kwargs):
            return self._frozen_result(func, args, kwargs, name)
        if any(lin.tag(t) in LIVE for t in _tensors(args[1:], kwargs)):
            self._refuse(name, "a live tensor reaches a parameter of the activation")
        value = func(*args, **kwargs)
        if lin.tag(h) == N:
            return self._tag(value, N)
        lin.frozen[name] += 1
        factor = _factor(name, h.detach(), value.detach(), kwargs)
        self._note("activation", {"g": factor})
        return self._tag(_surrogate(value, h * factor), A)

    def _frozen_result(self, func, args, kwargs, name):
        """A nonlinear op whose result is frozen whole (F)."""
        self.lin.frozen[name] += 1
        result = tree_map(_plain, func(*args, **kwargs))
        self._note("frozen", {"out": result}, exclude=_tensors(args, kwargs))
        return self._tag(result, F)

    def _norm(self, func, args, kwargs, name):
        """Fused LayerNorm/RMSNorm: mean subtraction live, 1/std frozen."""
        lin = self.lin
        h, shape, weight, bias, eps = _norm_arguments(name, args, kwargs)
        if any(lin.tag(t) in LIVE for t in (weight,) if t is not None):
            self._refuse(name, "the norm's weight depends on x")
        value = func(*args, **kwargs)
        if lin.tag(h) == N or lin.tag(bias) == N:
            return self._tag(value, N)
        dims = tuple(range(-len(shape), 0))
        hd = h.detach()
        center = name == "layer_norm"
        if center:
            inv = torch.rsqrt(hd.var(dims, unbiased=False, keepdim=True) + (1e-5 if eps is None else eps))
            live = (h - h.mean(dims, keepdim=True)) * inv
        else:
            inv = torch.rsqrt(hd.pow(2).mean(dims, keepdim=True) + (torch.finfo(h.dtype).eps if eps is None else eps))
            live = h * inv
        live = live if weight is None else live * weight.detach()
        tag = L
        if bias is not None:
            if lin.tag(bias) in (L, A):
                live = live + bias
            elif _nonzero(bias):
                tag = N
        lin.frozen[name] += 1
        self._note("norm", {"inv": inv, "dims": dims, "center": center, "name": name}, tag)
        return self._tag(_surrogate(value, live), tag)

    def _sdpa(self, func, args, kwargs):
        """scaled_dot_product_attention: P = softmax(QKᵀ·scale + mask) frozen, V live."""
        lin = self.lin
        bound = _sdpa_arguments(args, kwargs)
        if bound.get("dropout_p", 0.0):
            self._refuse("scaled_dot_product_attention", "attention dropout is random")
        q, k, v = bound["query"].detach(), bound["key"].detach(), bound["value"]
        mask = bound.get("attn_mask")
        if mask is not None and lin.tag(mask) in LIVE:
            self._refuse("scaled_dot_product_attention", "the attention mask depends on x")
        value = func(*args, **kwargs)
        v_tag = lin.tag(v)
        if v_tag == N:
            return self._tag(value, N)
        scale = bound.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention: each kv head serves several q heads
            groups = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
        if bound.get("is_causal"):
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores, dim=-1).detach()
        lin.frozen["scaled_dot_product_attention"] += 1
        self._note("sdpa", {"P": probs}, L, exclude=[bound["query"], bound["key"]] + ([mask] if mask is not None else []))
        return self._tag(_surrogate(value, probs.to(v.dtype) @ v), L if v_tag in (L, A) else F)


def target_written(name: str, args) -> bool:
    """True for an in-place op (add_, __iadd__, __setitem__, copy_) on a tensor."""
    inplace = name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))
    return inplace and bool(args) and isinstance(args[0], torch.Tensor)


_RUN = object()  # _replay's answer for an op that is linear in its live inputs: run it as it is


@dataclass
class _Entry:
    """One recorded live op: its name, how it was linearized, and the frozen values a replay applies."""

    name: str
    kind: str  # "plain", "frozen", "activation", "norm", "sdpa" or "substitute"
    values: dict
    tag: str | None


def _mutable(args, kwargs):
    """args as a list (einsum's operand list copied too) and kwargs as a dict, for slot substitution."""
    args = list(args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args[1] = list(args[1])
    return args, dict(kwargs)


def _get(args, kwargs, slot):
    kind, index = slot
    if kind == "k":
        return kwargs[index]
    if kind == "e":
        return args[1][index] if isinstance(args[1], list) else args[1 + index]
    return args[index]


def _put(args, kwargs, slot, value) -> None:
    kind, index = slot
    if kind == "k":
        kwargs[index] = value
    elif kind == "e" and isinstance(args[1], list):
        args[1][index] = value
    else:
        args[1 + index if kind == "e" else index] = value


def _narrow(value: torch.Tensor, shape, start: int) -> torch.Tensor:
    """A recorded value cut to a replay's token window: every axis longer than `shape`'s (aligned from the right)
    is a token axis, narrowed to tokens start…; size-1 and batch axes broadcast."""
    for axis in range(-1, -min(value.dim(), len(shape)) - 1, -1):
        if value.shape[axis] > shape[axis]:
            value = value.narrow(axis, start, shape[axis])
    return value


def _norm_arguments(name: str, args, kwargs):
    """(input, normalized_shape, weight, bias, eps) of layer_norm / rms_norm."""
    names = ("input", "normalized_shape", "weight", "bias", "eps") if name == "layer_norm" else (
        "input", "normalized_shape", "weight", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    return bound["input"], bound["normalized_shape"], bound.get("weight"), bound.get("bias"), bound.get("eps")


def _sdpa_arguments(args, kwargs) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    return {**dict(zip(names, args)), **kwargs}


def _split_name(frozen_kind: str, other: str) -> str:
    """Name the split a product took: eq. 8 freezes the activation output, 'gate' the other branch."""
    if frozen_kind == A and other == L:
        return "activation frozen (paper eq. 8)"
    if frozen_kind == L and other == A:
        return "gate live (mlp_split='gate')"
    if frozen_kind == N and other == A:
        return "non-linear factor frozen, activation live"
    return {N: "non-linear factor frozen", A: "activation frozen", L: "linear factor frozen"}[frozen_kind]


def _keeps_zero(name: str, args, kwargs) -> bool:
    """clamp/hardtanh/threshold keep f(0) = 0 only when 0 lies inside the kept range."""
    if name == "threshold":  # f(x) = x if x > t else v: f(0) = 0 when t < 0, or when v = 0
        threshold = args[1] if len(args) > 1 else kwargs.get("threshold", 0)
        return (args[2] if len(args) > 2 else kwargs.get("value", 0)) == 0 or threshold < 0
    lo = args[1] if len(args) > 1 else kwargs.get("min", kwargs.get("min_val", -1.0 if name == "hardtanh" else None))
    hi = args[2] if len(args) > 2 else kwargs.get("max", kwargs.get("max_val", 1.0 if name == "hardtanh" else None))
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return False
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def _factor(name: str, h: torch.Tensor, value: torch.Tensor, kwargs) -> torch.Tensor:
    """g(h) with f(h) = h·g(h): explicit formulas where they exist, else where(h ≠ 0, f(h)/h, f'(0))."""
    if name == "silu":
        return torch.sigmoid(h)
    if name == "gelu" and kwargs.get("approximate", "none") == "none":
        return 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "gelu":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
    if name == "relu":
        return (h > 0).to(h.dtype)
    return torch.where(h != 0, value / torch.where(h != 0, h, 1), SLOPE_AT_ZERO.get(name, 0.0)).to(h.dtype)


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
        tensors = _tensors(args, kwargs)
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
            for t in _tensors(args, kwargs):
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
        with _decomposed_autograd_functions(lin), _Mode(lin):
            yield lin
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in grads:
            p.requires_grad_(flag)
        model.__dict__.pop("_lllm_detached", None)
