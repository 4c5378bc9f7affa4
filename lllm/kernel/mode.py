"""The interceptor: a TorchFunctionMode that tags every result, applies the op table's rules to ops that
see a live tensor, refuses unknown ones, and records or replays the frozen values (`OpLinearization`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from lllm.errors import CoverageError, ReplayError
from lllm.kernel import optable as ops
from lllm.kernel.opargs import (
    Entry, RUN, broadcast_shape, concatenated_shape, get_slot, map_tensors, metadata_signature, modeling_caller,
    mutable_arguments, narrow_to_window, norm_arguments, on_meta, op_name, put_slot, reduced_shape, sdpa_arguments,
    target_written, tensors_in,
)
from lllm.kernel.optable import C, F, L, A, N, LIVE
from lllm.kernel.rules import OpRules

if TYPE_CHECKING:
    from lllm.kernel.oplevel import OpLinearization


class LinearizingMode(OpRules, TorchFunctionMode):
    """The interceptor: tags every result, rewrites nonlinear ops on live tensors, refuses unknown ones."""

    def __init__(self, lin: OpLinearization):
        super().__init__()
        self.lin = lin

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        lin, name = self.lin, op_name(func)
        if lin.bypass:
            return func(*args, **kwargs)
        if name in ops.METADATA:  # a shape, dtype or device: no value flows, nothing to tag or key
            result = func(*args, **kwargs)
            return lin.device if isinstance(result, torch.device) and result.type == "meta" else result
        if not lin.stack or name in ops.PASSTHROUGH:  # outside the model's forwards: engine code
            result = func(*args, **kwargs)
            if name in ops.PASS and lin.tag(args[0] if args else None) in LIVE:
                self._tag(result, lin.tag(args[0]))  # y = out[0, position] keeps its tag
                if args[0] in lin.producer:  # and its producer, for what a replay must compute
                    for t in tensors_in(result):
                        lin.producer[t] = lin.producer[args[0]]
            return result
        tensors = tensors_in(args, kwargs)
        tags = [self._checked_tag(t, name) for t in tensors]
        live = [t for t, tag in zip(tensors, tags) if tag in LIVE]
        wide = self._float64(tensors, tags)
        if lin.float64 and name in ops.CASTS and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            wide = True  # a float64 weight cast down (Gemma's weight.float()) would round what meets x
        if wide and name in ops.CASTS:
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
            if replayed is not RUN:
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
        if name in ops.CONSTRUCTORS:
            return self._tag(func(*args, **kwargs), C)
        if name in ops.PASS or base in ops.PASS:
            return self._pass(func, args, kwargs, name)
        if name in ops.PRODUCTS:
            return self._product(func, args, kwargs, name)
        if name in ops.ADDITIVE or base in ops.ADDITIVE:
            return self._additive(func, args, kwargs, name)
        if name == "scaled_dot_product_attention":
            return self._sdpa(func, args, kwargs)
        if name in ("layer_norm", "rms_norm"):
            return self._norm(func, args, kwargs, name)
        if base in ops.ACTIVATIONS or name in ops.ACTIVATIONS:
            if inplace:
                self._refuse(name, "an in-place nonlinear op rewrites a live tensor that autograd has saved")
            return self._activation(func, args, kwargs, base)
        if name in ops.FREEZING or base in ops.FREEZING:
            if inplace and lin.tag(args[0]) in LIVE:
                self._refuse(name, "an in-place nonlinear op rewrites a live tensor that autograd has saved")
            if name in ("softmax", "log_softmax", "_softmax") and wide and kwargs.get("dtype") is not None:
                kwargs = {**kwargs, "dtype": torch.float64}
            return self._frozen_result(func, args, kwargs, name)
        result = func(*args, **kwargs)
        if not tensors_in(result):
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
        lin.entries[key] = Entry(name, pending["kind"], pending["values"], tag)
        if target_written(name, args):
            lin.inplace.add(key)
        lin.deps[key] = {lin.producer[t] for t in tensors if id(t) not in pending["exclude"] and t in lin.producer}
        for t in tensors_in(result):
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
            for t in tensors_in(result):
                lin.producer[t] = key

    def _replay(self, func, args, kwargs, name, key, tensors):
        try:
            return self._replay_op(func, args, kwargs, name, key, tensors)
        except RuntimeError as error:  # a recorded value that does not broadcast to the batch (flattened tokens)
            raise ReplayError(f"op {name!r} of {key[0]!r} cannot be replayed on this batch ({error})") from error

    def _replay_op(self, func, args, kwargs, name, key, tensors):
        """The recorded op at `key` applied to this pass's inputs; RUN when it is linear and simply runs."""
        lin = self.lin
        entry = lin.entries.get(key)
        if entry is None or entry.name != name:
            raise ReplayError(
                f"the replayed forward diverged from the recorded one at op {key[1]} of module {key[0]!r}: recorded "
                f"{entry.name if entry else 'nothing'!r}, now {name!r}; use the reverse method for this model")
        if key not in lin.needed:  # it only feeds frozen values: shapes are enough
            if lin.remember_dead:
                return self._dead_remembered(func, args, kwargs, name, key)
            return self._dead(func, args, kwargs)
        kind, values = entry.kind, entry.values
        if kind == "plain" and any(t.is_meta for t in tensors):  # frozen kinds read only their live inputs
            raise ReplayError(f"op {name!r} of {key[0]!r} needs a value the replay skipped: a frozen value was "
                                     "recorded on a path the analysis missed; use the reverse method")
        if kind == "frozen":
            if name in ops.SHAPE_PRESERVING_FREEZES and tensors and isinstance(values["out"], torch.Tensor):
                shape = broadcast_shape(*(t.shape for t in tensors))  # the result's shape, inputs broadcast
                return self._tag(self._narrowed(values["out"], shape), F)
            shapes = self._dead(func, args, kwargs)
            out = tree_map(lambda v, m: self._narrowed(v, m.shape) if isinstance(v, torch.Tensor) else v,
                           values["out"], shapes)
            return self._tag(out, F)
        if kind == "activation":
            h = args[0]
            return self._tag(h * self._narrowed(values["g"], h.shape), A)
        if kind == "norm":
            h, _, weight, bias, _ = norm_arguments(values["name"], args, kwargs)
            inv = spread_last_axis(self._narrowed(values["inv"], h.shape), h)
            live = (h - h.mean(values["dims"], keepdim=True)) * inv if values["center"] else h * inv
            live = live if weight is None else live * weight
            return self._tag(live if bias is None else live + bias, entry.tag)
        if kind == "sdpa":
            bound = sdpa_arguments(args, kwargs)
            q, k, v = bound["query"], bound["key"], bound["value"]
            probs = self._narrowed(values["P"], (*q.shape[:-1], k.shape[-2])).to(v.dtype)
            if shared_frozen_factor((probs, v), F):
                return self._tag(shared_probs_times_values(probs[0], v), L)
            if v.shape[-3] != probs.shape[-3]:
                v = v.repeat_interleave(probs.shape[-3] // v.shape[-3], -3)
            return self._tag(probs @ v, L)
        if kind == "substitute":
            args, kwargs = mutable_arguments(args, kwargs)
            for slot, value in values.items():
                put_slot(args, kwargs, slot, self._narrowed(value, get_slot(args, kwargs, slot).shape))
            return self._tag(func(*args, **kwargs), entry.tag)
        if name == "linear" and lin.identity_input is not None and args and args[0] is lin.identity_input:  # composing an MLP: I·Wᵀ is Wᵀ, bit for bit
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            # (d_in, T, d_out), rows contiguous: what multiplies it next comes out contiguous, a plain GEMM's input
            out = weight.mT.contiguous()[:, None, :].expand(*args[0].shape[:-1], weight.shape[0])
            return self._tag(out if bias is None else out + bias, entry.tag or L)
        if name in ("mul", "__mul__", "__rmul__") and len(args) == 2 and not kwargs and all(
                isinstance(t, torch.Tensor) for t in args):  # eager RMSNorm's h * rsqrt(…)
            a, b = args
            a = spread_last_axis(a, b) if lin.tags.get(a) == F else a
            args = (a, spread_last_axis(b, a) if lin.tags.get(b) == F else b)
        if (name in ("matmul", "__matmul__") and len(args) == 2 and not kwargs
                and shared_frozen_factor(args, lin.tags.get(args[0]))
                and args[1].shape[1] in (1, args[0].shape[1])):  # matmul broadcasts one key head, never groups
            return self._tag(shared_probs_times_values(args[0][0], args[1]), entry.tag)  # eager attention's P @ v
        if entry.tag is not None:  # linear in its live inputs, out of place: run it, tag as recorded
            return self._tag(func(*args, **kwargs), entry.tag)
        return RUN

    def _narrowed(self, value: torch.Tensor, shape) -> torch.Tensor:
        """A recorded value cut to this replay's token window (see narrow_to_window), or a ReplayError where an axis
        would shrink to anything but the window (tokens flattened with the batch, as OPT's MLP does)."""
        lin = self.lin
        window = None if lin.stop is None else lin.stop - lin.start
        for axis in range(-1, -min(value.dim(), len(shape)) - 1, -1):
            if value.shape[axis] > shape[axis] and shape[axis] != window:
                raise ReplayError(f"a recorded value of shape {tuple(value.shape)} does not fit a replayed shape "
                                  f"{tuple(shape)} (token window {window}): tokens are flattened with the batch")
        return narrow_to_window(value, shape, lin.start)

    def _dead(self, func, args, kwargs):
        """The op on the meta device: its result's shape and dtype without its arithmetic. Metadata (a shape, a
        dtype) is the same as the real one; a device is the model's, so that what is made from it is real."""
        name = op_name(func)
        tensors = tensors_in(args, kwargs) if name in ops.ELEMENTWISE else ()
        if tensors and name not in ("to", "float", "type_as") and all(t.dim() for t in tensors):
            dtype = tensors[0].dtype  # float tensors of one dtype here; python scalars do not widen them
            for t in tensors[1:]:
                dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else dtype
            shape = broadcast_shape(*(t.shape for t in tensors))
            return self._tag(torch.empty(shape, dtype=dtype, device="meta"), N)
        reduced = reduced_shape(name, args, kwargs)
        if reduced is not None and args[0].is_floating_point():  # a float sum or mean keeps its dtype
            return self._tag(torch.empty(reduced, dtype=args[0].dtype, device="meta"), N)
        joined = concatenated_shape(name, args, kwargs)
        if joined is not None:
            return self._tag(torch.empty(joined, dtype=args[0][0].dtype, device="meta"), N)
        if name == "linear":
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            return self._tag(torch.empty((*args[0].shape[:-1], weight.shape[0]), dtype=args[0].dtype, device="meta"), N)
        result = func(*map_tensors(on_meta, args), **map_tensors(on_meta, kwargs))
        if isinstance(result, torch.device) and result.type == "meta":
            return self.lin.device
        return self._tag(result, N)

    def _dead_remembered(self, func, args, kwargs, name, key):
        """`_dead`, its result's metadata remembered per (op key, input metadata) within one token window
        (`OpLinearization.replay`): a meta computation reads nothing else, so the chunks of a window pay for it once.
        Results other than meta tensors (a device, a number) are not remembered."""
        signature = None if target_written(name, args) else metadata_signature(args, kwargs)
        remembered = self.lin.dead_results.get((key, signature)) if signature is not None else None
        if remembered is not None:
            single, metas = remembered
            made = [torch.empty_strided(shape, stride, dtype=dtype, device="meta", requires_grad=grad)
                    for shape, stride, dtype, grad in metas]
            return self._tag(made[0] if single else tuple(made), N)
        result = self._dead(func, args, kwargs)
        single = isinstance(result, torch.Tensor)
        leaves = [result] if single else list(result) if type(result) is tuple else [None]
        if signature is not None and all(isinstance(t, torch.Tensor) and t.is_meta for t in leaves):
            self.lin.dead_results[(key, signature)] = (
                single, [(t.shape, t.stride(), t.dtype, t.requires_grad) for t in leaves])
        return result

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
        for t in tensors_in(result):
            self.lin.tags[t] = tag
        return result

    def _refuse(self, name: str, why: str):
        path = self.lin.stack[-1] if self.lin.stack else "<root>"
        raise CoverageError(
            f"op {name!r} in module {path or '<root>'!r} at {modeling_caller()} sees a tensor that depends on the input "
            f"embeddings, and {why}. lllm cannot prove the detached Jacobian exact there, so it refuses rather "
            "than return a silently wrong number."
        )


def spread_last_axis(factor, other):
    """A frozen factor of last axis 1, e.g. a norm's 1/rms (1, W, 1), laid out (1, W, d) as `other` (B, W, d) when
    that costs no more than `other` itself: the same products, but a broadcast over the leading axis instead of the
    last runs ~6× faster, forward and in the VJPs' backward."""
    if (isinstance(factor, torch.Tensor) and isinstance(other, torch.Tensor) and factor.dim() <= other.dim()
            and factor.dim() and factor.shape[-1] == 1 < other.shape[-1]
            and factor.numel() * other.shape[-1] <= other.numel()):
        return factor.expand(*factor.shape[:-1], other.shape[-1]).contiguous()
    return factor


def shared_frozen_factor(operands, left_tag: str | None) -> bool:
    """Whether operands are a frozen (1, H, W, W') factor and a batch of replayed rows (B, KV, W', hd), H = KV·g."""
    left, right = operands
    return (left_tag == F and isinstance(right, torch.Tensor) and left.dim() == right.dim() == 4
            and left.shape[0] == 1 < right.shape[0] and left.shape[1] % right.shape[1] == 0
            and left.shape[-1] == right.shape[-2] and left.dtype == right.dtype)


def shared_probs_times_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P @ v for one frozen softmax P (H, Wq, Wk) shared by a batch of replayed values v (B, KV, Wk, hd), H = KV·g.

    Broadcasting P over the batch runs B·H tiny (Wq, Wk) products; grouping the g query heads of each key head
    and the batch into one GEMM per key head, (g·Wq, Wk) @ (Wk, B·hd), gives the same sums ~3× faster."""
    B, KV, Wk, hd = v.shape
    H, Wq = probs.shape[0], probs.shape[1]  # queries Wq, keys Wk (the same in lllm's own token windows)
    v_grouped = v.permute(1, 2, 0, 3).reshape(KV, Wk, B * hd)  # (KV, Wk, B·hd)
    out = torch.bmm(probs.reshape(KV, H // KV * Wq, Wk), v_grouped)  # (KV, g·Wq, B·hd)
    return out.view(KV, H // KV, Wq, B, hd).permute(3, 0, 1, 2, 4).reshape(B, H, Wq, hd)  # (B, H, Wq, hd)
