"""float32_products: float16 products on the CPU summed in float32, rounded once; the rest of the model untouched."""

import pytest
import torch

import lllm
from lllm.errors import NumericalRangeError
from lllm.kernel import precision
from lllm.kernel.precision import Float32Products, float32_products, uses_float32_products
from tiny import IdsTokenizer, tiny_model

IDS = [3, 17, 5, 42, 8, 11]


class _Counting(Float32Products):
    """Float32Products that counts the products it widens."""

    def __init__(self):
        super().__init__()
        self.widened = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in precision.PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in args):
            self.widened += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_a_float16_product_is_the_float32_product_rounded_once():
    g = torch.Generator().manual_seed(0)
    a, b, bias = (torch.randn(shape, generator=g).half() for shape in ((33, 70), (70, 19), (19,)))
    with Float32Products():
        mm, addmm, bmm = a @ b, torch.addmm(bias, a, b), torch.bmm(a[None], b[None])
    for result in (mm, addmm, bmm):
        assert result.dtype == torch.float16
    assert torch.equal(mm, (a.float() @ b.float()).half())
    assert torch.equal(addmm, torch.addmm(bias.float(), a.float(), b.float()).half())
    assert torch.equal(bmm[0], mm)


def test_the_detached_jacobian_of_a_float16_model_catches_the_backward_products_too():
    model16 = tiny_model("llama", torch.float16)
    assert uses_float32_products(model16) and not uses_float32_products(tiny_model("llama"))
    forward, jacobian = _Counting(), _Counting()
    with torch.no_grad(), forward:
        model16(torch.tensor([IDS]))
    with jacobian:
        result = lllm.detached_jacobian(model16, IdsTokenizer(), IDS, progress=False)
    assert forward.widened > 0
    # its forward has no more products than the model's (no lm_head): the excess are the reverse passes'
    assert jacobian.widened > forward.widened
    assert result.jacobian.dtype == torch.float16
    reference = lllm.detached_jacobian(tiny_model("llama"), IdsTokenizer(), IDS, progress=False)
    error = (result.jacobian.float() - reference.jacobian).norm() / reference.jacobian.norm()
    assert error < 1e-2  # a float16 computation of the same map: float16's precision, not another map


def test_float32_products_leave_a_float32_model_untouched():
    model = tiny_model("llama")
    before = lllm.detached_jacobian(model, IdsTokenizer(), IDS, progress=False)
    with float32_products(model) as active:
        after = lllm.detached_jacobian(model, IdsTokenizer(), IDS, progress=False)
    assert active is False
    assert torch.equal(before.jacobian, after.jacobian)


def test_a_forward_that_overflows_its_dtype_is_refused_before_any_jacobian_work():
    model = tiny_model("llama", torch.float16)
    scale = lambda module, args, out: (out[0] * 1e5, *out[1:]) if isinstance(out, tuple) else out * 1e5  # noqa: E731
    handle = model.model.layers[0].register_forward_hook(scale)  # linear, but past float16's 65504: inf, then NaN
    try:
        with pytest.raises(NumericalRangeError, match="overflow"), float32_products(model):
            lllm.detached_jacobian(model, IdsTokenizer(), IDS, progress=False)
    finally:
        handle.remove()
