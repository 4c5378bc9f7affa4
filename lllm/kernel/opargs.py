"""Reading and rewriting the arguments of torch ops for the mode: the tensors they hold, argument slots,
the signatures of the fused norms and sdpa, the factor g(h) of an activation f(h) = h·g(h), and which
modeling-code line called an op."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map

from lllm.kernel import optable as ops
from lllm.kernel.optable import A, L, LIVE, N

LLLM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the lllm package
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def op_name(func) -> str:
    """The op's name; a property getter is named after its property (Tensor.T -> 'T'). A torch.ops overload
    (aten.mean.dim) keeps its whole name, so that no table entry matches it: on a live tensor it is refused."""
    if type(func).__name__ in ("OpOverload", "OpOverloadPacket"):
        return f"torch.ops.{func}"
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.rsplit(".", 1)[-1]


def modeling_caller() -> str:
    """file:line of the innermost frame outside torch and lllm: the modeling code that called the op."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(TORCH_DIR) or path.startswith(LLLM_DIR)):
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "<unknown>"


def tensors_in(*objs) -> list:
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
                    found.extend(tensors_in(item))
        elif isinstance(obj, dict):
            found.extend(tensors_in(list(obj.values())))
    return found


def map_tensors(fn, obj):
    """obj with fn applied to every tensor, one level into lists, tuples and dicts (what torch ops take)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(map_tensors(fn, item) for item in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def on_meta(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_meta else t.to("meta")


def surrogate(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """`value` as a tensor whose derivative is that of `live`: the forward stays bit-for-bit value."""
    return value.detach() + (live - live.detach())


def zeros_for_live(lin, obj):
    """`obj` with every live tensor replaced by zeros: the constant part of an additive op."""
    return tree_map(lambda t: torch.zeros_like(t.detach()) if lin.tag(t) in LIVE else plain_value(t), obj)


def plain_value(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def nonzero(result) -> bool:
    tensors = tensors_in(result)
    return any(bool(t.detach().ne(0).any()) for t in tensors if t.numel())


def target_written(name: str, args) -> bool:
    """True for an in-place op (add_, __iadd__, __setitem__, copy_) on a tensor."""
    inplace = name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))
    return inplace and bool(args) and isinstance(args[0], torch.Tensor)


def broadcast_shape(*shapes) -> tuple:
    """torch.broadcast_shapes for concrete shapes, without its symbolic-shape machinery (~45 µs a call)."""
    first = tuple(shapes[0])
    if all(tuple(s) == first for s in shapes[1:]):
        return first
    out = []
    for axis in range(-max(len(s) for s in shapes), 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def reduced_shape(name: str, args, kwargs) -> tuple | None:
    """The result's shape of sum or mean over given dims (None for any other call: the meta kernel decides)."""
    if name not in ("mean", "sum") or not args or not isinstance(args[0], torch.Tensor) or len(args) > 3:
        return None
    if set(kwargs) - {"dim", "keepdim"}:
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = (dim,) if type(dim) is int else tuple(dim) if isinstance(dim, (tuple, list)) and dim else None
    if dims is None or not all(type(d) is int for d in dims) or type(keepdim) is not bool:
        return None
    shape, n = args[0].shape, args[0].dim()
    if not all(-n <= d < n for d in dims):
        return None
    cut = {d % n for d in dims}
    if len(cut) != len(dims):  # a dim named twice: torch's error, from the meta kernel
        return None
    return tuple(1 if i in cut else size for i, size in enumerate(shape) if keepdim or i not in cut)


def concatenated_shape(name: str, args, kwargs) -> tuple | None:
    """The result's shape of cat on tensors of one dtype and rank (None for any other call)."""
    if name not in ("cat", "concat", "concatenate") or len(args) not in (1, 2) or set(kwargs) - {"dim"}:
        return None
    parts, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or not parts or type(dim) is not int:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() == parts[0].dim() > 0 and t.dtype == parts[0].dtype
               for t in parts) or not -parts[0].dim() <= dim < parts[0].dim():
        return None
    dim %= parts[0].dim()
    if any(t.shape[:dim] != parts[0].shape[:dim] or t.shape[dim + 1:] != parts[0].shape[dim + 1:] for t in parts):
        return None  # the meta kernel raises its own error
    return (*parts[0].shape[:dim], sum(t.shape[dim] for t in parts), *parts[0].shape[dim + 1:])


def metadata_signature(args, kwargs) -> tuple | None:
    """What an op's meta computation reads: each tensor's shape, strides, dtype, device type and requires_grad, the
    grad mode, and every other argument, which must be hashable (None where one is not: the result is then not
    remembered)."""
    leaves, spec = tree_flatten((args, kwargs))
    signature = [spec, torch.is_grad_enabled()]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            signature.append((leaf.shape, leaf.stride(), leaf.dtype, leaf.device.type, leaf.requires_grad))
        elif isinstance(leaf, slice) and all(v is None or type(v) is int for v in (leaf.start, leaf.stop, leaf.step)):
            signature.append(("slice", leaf.start, leaf.stop, leaf.step))  # slices hash only from Python 3.12
        elif leaf is None or leaf is Ellipsis or isinstance(leaf, (bool, int, float, str, torch.dtype, torch.device)):
            signature.append((type(leaf), leaf))  # the type too: 1, 1.0 and True hash alike
        else:
            return None
    signature = tuple(signature)
    try:
        hash(signature)
    except TypeError:  # an unhashable spec context
        return None
    return signature


RUN = object()  # _replay's answer for an op that is linear in its live inputs: run it as it is


@dataclass
class Entry:
    """One recorded live op: its name, how it was linearized, and the frozen values a replay applies."""

    name: str
    kind: str  # "plain", "frozen", "activation", "norm", "sdpa" or "substitute"
    values: dict
    tag: str | None


def mutable_arguments(args, kwargs):
    """args as a list (einsum's operand list copied too) and kwargs as a dict, for slot substitution."""
    args = list(args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args[1] = list(args[1])
    return args, dict(kwargs)


def get_slot(args, kwargs, slot):
    kind, index = slot
    if kind == "k":
        return kwargs[index]
    if kind == "e":
        return args[1][index] if isinstance(args[1], list) else args[1 + index]
    return args[index]


def put_slot(args, kwargs, slot, value) -> None:
    kind, index = slot
    if kind == "k":
        kwargs[index] = value
    elif kind == "e" and isinstance(args[1], list):
        args[1][index] = value
    else:
        args[1 + index if kind == "e" else index] = value


def narrow_to_window(value: torch.Tensor, shape, start: int) -> torch.Tensor:
    """A recorded value cut to a replay's token window: every axis longer than `shape`'s (aligned from the right)
    is a token axis, narrowed to tokens start…; size-1 and batch axes broadcast."""
    for axis in range(-1, -min(value.dim(), len(shape)) - 1, -1):
        if value.shape[axis] > shape[axis]:
            value = value.narrow(axis, start, shape[axis])
    return value


def norm_arguments(name: str, args, kwargs):
    """(input, normalized_shape, weight, bias, eps) of layer_norm / rms_norm."""
    names = ("input", "normalized_shape", "weight", "bias", "eps") if name == "layer_norm" else (
        "input", "normalized_shape", "weight", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    return bound["input"], bound["normalized_shape"], bound.get("weight"), bound.get("bias"), bound.get("eps")


def sdpa_arguments(args, kwargs) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    return {**dict(zip(names, args)), **kwargs}


def split_name(frozen_kind: str, other: str) -> str:
    """Name the split a product took: eq. 8 freezes the activation output, 'gate' the other branch."""
    if frozen_kind == A and other == L:
        return "activation frozen (paper eq. 8)"
    if frozen_kind == L and other == A:
        return "gate live (mlp_split='gate')"
    if frozen_kind == N and other == A:
        return "non-linear factor frozen, activation live"
    return {N: "non-linear factor frozen", A: "activation frozen", L: "linear factor frozen"}[frozen_kind]


def keeps_zero(name: str, args, kwargs) -> bool:
    """clamp/hardtanh/threshold keep f(0) = 0 only when 0 lies inside the kept range."""
    if name == "threshold":  # f(x) = x if x > t else v: f(0) = 0 when t < 0, or when v = 0
        threshold = args[1] if len(args) > 1 else kwargs.get("threshold", 0)
        return (args[2] if len(args) > 2 else kwargs.get("value", 0)) == 0 or threshold < 0
    lo = args[1] if len(args) > 1 else kwargs.get("min", kwargs.get("min_val", -1.0 if name == "hardtanh" else None))
    hi = args[2] if len(args) > 2 else kwargs.get("max", kwargs.get("max_val", 1.0 if name == "hardtanh" else None))
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return False
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def activation_factor(name: str, h: torch.Tensor, value: torch.Tensor, kwargs) -> torch.Tensor:
    """g(h) with f(h) = h·g(h): explicit formulas where they exist, else where(h ≠ 0, f(h)/h, f'(0))."""
    if name == "silu":
        return torch.sigmoid(h)
    if name == "gelu" and kwargs.get("approximate", "none") == "none":
        return 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "gelu":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
    if name == "relu":
        return (h > 0).to(h.dtype)
    return torch.where(h != 0, value / torch.where(h != 0, h, 1), ops.SLOPE_AT_ZERO.get(name, 0.0)).to(h.dtype)
