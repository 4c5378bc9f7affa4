"""The rules of the op table, one method per class of op: how a product, an additive op, an activation,
a freezing op, a fused norm and sdpa are rewritten when they see a live tensor, and float64 kept wide.

Every rewrite returns `surrogate(value, s)` = value.detach() + (s − s.detach()), `value` being the op's own
result: the forward is bit-for-bit unchanged and only the derivative is the detached one.
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map

from lllm.kernel import optable as ops
from lllm.kernel.opargs import (
    activation_factor, get_slot, keeps_zero, map_tensors, mutable_arguments, nonzero, norm_arguments, on_meta,
    plain_value, put_slot, sdpa_arguments, split_name, surrogate, tensors_in, zeros_for_live,
)
from lllm.kernel.optable import C, F, L, A, N, LIVE


class OpRules:
    """The rules as methods of the mode (`LinearizingMode` sets self.lin and the bookkeeping they call)."""

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
            args, kwargs = map_tensors(on_meta, args), map_tensors(on_meta, kwargs)
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
        others = [t for t in tensors_in(args[1:], kwargs) if t is not source]
        if name == "embedding":  # F.embedding(ids, weight): linear in the table, ids must be constant
            source, others = args[1], [args[0]]
        if name in ops.CASTS or name.endswith("_as"):  # type_as(other), view_as(other): other gives only dtype/shape
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
        args, kwargs = mutable_arguments(args, kwargs)
        if name == "einsum":  # einsum(eq, *operands) or einsum(eq, [operands])
            n = len(args[1]) if len(args) == 2 and isinstance(args[1], list) else len(args) - 1
            slots = [("e", i) for i in range(n)]
        else:
            positions, keys = ops.PRODUCTS[name]
            slots = [("a", i) for i in positions if i < len(args)] + [("k", k) for k in keys if k in kwargs]
        factors = [s for s in slots if lin.tag(get_slot(args, kwargs, s)) in LIVE]
        tags = {s: lin.tag(get_slot(args, kwargs, s)) for s in factors}
        frozen: dict = {}

        def freeze(slot):
            operand = get_slot(args, kwargs, slot)
            frozen[slot] = (operand, operand.detach())
            put_slot(args, kwargs, slot, frozen[slot][1])
            factors.remove(slot)

        if name in ops.DIVISIONS and len(slots) > 1 and slots[1] in factors:  # a live denominator: a reciprocal
            freeze(slots[1])
            lin.frozen["reciprocal"] += 1
        if len(factors) >= 2:
            for kind in (N, A if lin.mlp_split == "activation" else L):
                for s in [s for s in factors if tags[s] == kind]:
                    if len(factors) < 2:
                        break
                    freeze(s)
                    lin.splits[split_name(kind, tags[factors[0]])] += 1
        if len(factors) >= 2:
            tag = N  # two live factors: Q·Kᵀ
        elif not factors:
            tag = F
        elif name not in ops.ELEMENTWISE_PRODUCTS:
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
        elif extra_tag in (C, F) and extra is not None and nonzero(extra):
            tag = N if product_tag in (L, A) else F
        elif extra_tag in (L, A) and product_tag == F:
            tag = N  # an x-dependent product beside a bias: not homogeneous
        else:
            tag = L if (L in (product_tag, extra_tag) or A in (product_tag, extra_tag)) else product_tag
        return tag, result

    def _additive(self, func, args, kwargs, name):
        lin = self.lin
        if name == "where" and len(args) == 1:  # where(cond): the indices of a frozen decision
            result = tree_map(plain_value, func(*args, **kwargs))
            self._note("frozen", {"out": result}, exclude=tensors_in(args, kwargs))
            return self._tag(result, F)
        if name == "where" and lin.tag(args[0]) in LIVE:  # a live condition is a frozen decision
            condition = args[0]
            args = (condition.detach(), *args[1:])
            self._note("substitute", {("a", 0): args[0]}, None, exclude=[condition])
        if name in ("masked_fill", "masked_fill_") and lin.tag(args[1]) in LIVE:
            self._refuse(name, "the mask depends on x")
        tensors = tensors_in(args, kwargs)
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
            constant = outplace(*zeros_for_live(lin, args), **zeros_for_live(lin, kwargs))
            tag = N if nonzero(constant) else L
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
        if name in ("clamp", "clip", "hardtanh", "threshold") and not keeps_zero(name, args, kwargs):
            return self._frozen_result(func, args, kwargs, name)
        if any(lin.tag(t) in LIVE for t in tensors_in(args[1:], kwargs)):
            self._refuse(name, "a live tensor reaches a parameter of the activation")
        value = func(*args, **kwargs)
        if lin.tag(h) == N:
            return self._tag(value, N)
        lin.frozen[name] += 1
        factor = activation_factor(name, h.detach(), value.detach(), kwargs)
        self._note("activation", {"g": factor})
        return self._tag(surrogate(value, h * factor), A)

    def _frozen_result(self, func, args, kwargs, name):
        """A nonlinear op whose result is frozen whole (F)."""
        self.lin.frozen[name] += 1
        result = tree_map(plain_value, func(*args, **kwargs))
        self._note("frozen", {"out": result}, exclude=tensors_in(args, kwargs))
        return self._tag(result, F)

    def _norm(self, func, args, kwargs, name):
        """Fused LayerNorm/RMSNorm: mean subtraction live, 1/std frozen."""
        lin = self.lin
        h, shape, weight, bias, eps = norm_arguments(name, args, kwargs)
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
            elif nonzero(bias):
                tag = N
        lin.frozen[name] += 1
        self._note("norm", {"inv": inv, "dims": dims, "center": center, "name": name}, tag)
        return self._tag(surrogate(value, live), tag)

    def _sdpa(self, func, args, kwargs):
        """scaled_dot_product_attention: P = softmax(QKᵀ·scale + mask) frozen, V live."""
        lin = self.lin
        bound = sdpa_arguments(args, kwargs)
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
        return self._tag(surrogate(value, probs.to(v.dtype) @ v), L if v_tag in (L, A) else F)
