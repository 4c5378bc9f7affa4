"""The op table: how each torch op relates to its live (x-dependent) inputs, and the tags it gives.

Tags: C constant, F frozen (detached, depends on x), L linear, A activation output h·g(h), N non-linear.
The rules that read these sets are in `lllm.kernel.rules`; the mode that applies them is
`lllm.kernel.mode`. Sets are read through this module (ops.PASS), so a test can patch one.
"""

import math

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
BINARY = ((0, 1), ("input", "other"))
PRODUCTS = {
    **dict.fromkeys(("mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply", "matmul", "__matmul__",
                     "__rmatmul__", "outer", "div", "__truediv__", "div_", "__itruediv__", "true_divide"), BINARY),
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

TAG_MEANING = {C: "constant", F: "a frozen, detached quantity", L: "linear", A: "linear",
                N: "non-linear in x: a nonlinearity reached it without being frozen"}
