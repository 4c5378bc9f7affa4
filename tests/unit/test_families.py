"""The seven families lllm started with, on a tiny random model of transformers' own class: what the model computes
(hidden states, both MLP splits) against J⁺.

J⁺'s reconstruction error in the default split, the ordinary Jacobian in float64 and the model after exit are
tested on every architecture (these families included, the same tiny models) in test_oplevel.py.
benchmarks/gpu_check.sh runs this module on CUDA (LLLM_TEST_DEVICE=cuda, see tests/tiny.py).
"""

import pytest
import torch

import lllm
from tiny import FAMILY_CONFIGS, IdsTokenizer, tiny_model

FAMILIES = sorted(FAMILY_CONFIGS)
PROMPT = "1 5 9 17 33 41 60 77 80 12"  # 10 tokens: longer than Gemma's/Mistral's sliding window of 4
TOK = IdsTokenizer()
MAX_ERROR = {torch.float32: 5e-6, torch.float64: 1e-12}


def _logits(model, prompt=PROMPT):
    ids = torch.tensor([[int(t) for t in prompt.split()]], device=model.device)
    return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_bitwise_unchanged_in_float32(family):
    model = tiny_model(family, torch.float32)
    reference = _logits(model)
    for split in lllm.kernel.oplevel.MLP_SPLITS:
        with lllm.detached(model, mlp_split=split):
            assert torch.equal(_logits(model), reference), split


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_y_is_the_models_hidden_state_and_the_gate_split_is_exact_too(family, dtype):
    model = tiny_model(family, dtype)
    result = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)  # its exactness: test_oplevel
    assert result.jacobian.shape == (32, 10, 32) and result.jacobian.dtype == dtype
    # y is what the model itself computes after its final norm at the last position. In float32 both are the
    # same computation, bit for bit. In float64 transformers runs its norms and softmax in float32 while lllm keeps
    # float64, so they agree to float32 precision only (test_oplevel checks float64 against a float64 computation).
    with torch.no_grad():
        ids = torch.tensor([result.token_ids], device=model.device)
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    if dtype == torch.float32:
        assert torch.equal(result.output, hidden)
    else:
        scale = hidden.abs().max().item()
        torch.testing.assert_close(result.output, hidden, rtol=1e-5, atol=1e-5 * scale)
    # the alternative split freezes a different factor: J⁺ changes, y and exactness do not
    other = lllm.detached_jacobian(model, TOK, PROMPT, progress=False, mlp_split="gate")
    assert torch.equal(other.output, result.output)
    assert other.relative_error <= MAX_ERROR[dtype]
    assert (other.jacobian - result.jacobian).norm() > 1e-3 * result.jacobian.norm()


@pytest.mark.parametrize("family", FAMILIES)
def test_ordinary_jacobian_does_not_reconstruct_in_float32(family):
    """The float64 case is check_architecture's (c) in test_oplevel."""
    model = tiny_model(family, torch.float32)
    assert lllm.ordinary_jacobian(model, TOK, PROMPT, progress=False).relative_error >= 1e-2


def test_qwen2_biases_make_the_map_affine_and_c_is_independent_of_y():
    model = tiny_model("qwen2", torch.float64)
    result = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    assert result.bias is not None and result.bias.norm() > 1e-3 * result.output.norm()
    linear_part = torch.einsum("otd,td->o", result.jacobian, result.inputs)
    assert lllm.relative_error(result.output, linear_part) > 1e-3  # without c the reconstruction fails
    assert result.relative_error <= 1e-12
    # c is the network's response to its biases alone: zeroing the v bias removes it
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.bias.zero_()
    assert lllm.detached_jacobian(model, TOK, PROMPT, progress=False).bias.abs().max() < 1e-12


def test_gemma_input_embeddings_include_the_sqrt_d_scale():
    model = tiny_model("gemma3", torch.float64)
    result = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    raw = model.get_input_embeddings().weight[result.token_ids]
    torch.testing.assert_close(result.inputs, raw * model.config.hidden_size**0.5)
