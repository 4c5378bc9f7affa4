"""Float16 on the CPU at the speed of float32: matrix products accumulated in float32 and rounded once.

PyTorch's CPU kernel for float16 matrix products is not vectorized on most x86 CPUs: SmolLM2's float16 J⁺ takes
183 s there on one thread, 98% of it in aten::mm. A GPU's float16 GEMM reads float16, accumulates in float32 and
rounds the result to float16 once; `float32_products` does the same on the CPU (8.4 s for that J⁺), and
keeps a float32 copy of the weights while it is active (the memory of the model in float32, once). Every other
op runs as the model asks, so activations, weights and every op's result stay float16: the model is still a
float16 model, its products are summed in another order than PyTorch's CPU kernel sums them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

_aten = torch.ops.aten
PRODUCTS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})


class Float32Products(TorchDispatchMode):
    """Below autograd, so that the forward's and every backward's products are caught: a float16 product on the
    CPU runs in float32 and its result is rounded to float16.

    `parameters` (a model's) are widened once, on first use, and kept for the mode's lifetime: products read them
    as fresh views (W.t()) at every call, and widening a weight each time was a quarter of the time. The copies
    are not refreshed: the parameters must not change while the mode is active (lllm never writes them).
    """

    def __init__(self, parameters=()):
        super().__init__()
        self._parameters = {p.untyped_storage().data_ptr(): p for p in parameters if _owns_its_storage(p)}
        self._widened: dict[int, torch.Tensor] = {}

    def _widen(self, value):
        """A float16 tensor as float32 (exact): a view of the kept widened parameter where it is one."""
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float16:
            return value
        key = value.untyped_storage().data_ptr()
        parameter = self._parameters.get(key)
        if parameter is None:
            return value.float()
        if key not in self._widened:
            self._widened[key] = parameter.float()  # contiguous, as the parameter: the same strides
        return self._widened[key].as_strided(value.size(), value.stride(), value.storage_offset())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 and a.device.type == "cpu"
                                    for a in args):
            return func(*tree_map(self._widen, args), **tree_map(self._widen, kwargs)).to(torch.float16)
        return func(*args, **kwargs)


def _owns_its_storage(parameter: torch.Tensor) -> bool:
    """A contiguous float16 tensor that is all of its storage (so that a view's offset and strides carry over)."""
    return (parameter.dtype == torch.float16 and parameter.is_contiguous() and parameter.storage_offset() == 0
            and parameter.untyped_storage().nbytes() == parameter.numel() * parameter.element_size())


def uses_float32_products(model: nn.Module) -> bool:
    """Whether `float32_products(model)` changes anything: a float16 model on the CPU."""
    weight = next(model.parameters(), None)
    return weight is not None and weight.dtype == torch.float16 and weight.device.type == "cpu"


@contextmanager
def float32_products(model: nn.Module) -> Iterator[bool]:
    """Within it, a float16 CPU model's matrix products accumulate in float32 (see the module docstring); other
    models run untouched. Yields whether it is active."""
    if not uses_float32_products(model):
        yield False
        return
    with Float32Products(model.parameters()):
        yield True
