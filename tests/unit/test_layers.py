"""Cumulative and layer-wise detached Jacobians on tiny models of every family (paper Fig. 6)."""

import pytest
import torch

import lllm
from lllm.kernel.layers import COMPONENTS, cumulative_jacobians, layerwise_jacobians
from tiny import ARCHITECTURES, FAMILY_CONFIGS, NO_BATCHED_REPLAY, IdsTokenizer, tiny_architecture, tiny_model

FAMILIES = sorted(FAMILY_CONFIGS)
PROMPT = "1 5 9 17 33 41 60"
TOK = IdsTokenizer()
MAX_ERROR = {torch.float32: 5e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_and_component_reconstructs_its_output(family, dtype):
    model = tiny_model(family, dtype)
    for compute in (cumulative_jacobians, layerwise_jacobians):
        result = compute(model, TOK, PROMPT, progress=False)
        assert result.layers == [0, 1]
        for comp in COMPONENTS:
            assert result.jacobian[comp].shape == (2, 32, 7, 32)
            assert max(result.relative_errors(comp)) <= MAX_ERROR[dtype], (compute.__name__, comp)


@pytest.mark.parametrize("family", FAMILIES)
def test_cumulative_last_layer_equals_final_detached_jacobian(family):
    model = tiny_model(family, torch.float64)
    final = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    cumulative = cumulative_jacobians(model, TOK, PROMPT, layers=[-1], components=["layer"], progress=False)
    torch.testing.assert_close(cumulative.output["layer"][0], final.output, rtol=0, atol=1e-12)
    torch.testing.assert_close(cumulative.jacobian["layer"][0], final.jacobian, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_the_final_jacobian_is_taken_from_the_cumulative_run_only_where_it_is_the_same(dtype):
    """analyze and the sweep take the final J⁺ from the cumulative run's last layer: it must be the J⁺ of what
    lm_head reads (≤ 1e-5 relative in fp32); where lm_head reads something else (a hook), it is computed."""
    from lllm.kernel.layers import final_from_cumulative

    model = tiny_model("llama", dtype)
    direct = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    cumulative = cumulative_jacobians(model, TOK, PROMPT, layers=[0, 1], progress=False)
    reused = final_from_cumulative(model, cumulative)
    assert reused is not None and reused.meta["from"].startswith("cumulative")
    scale = direct.jacobian.abs().max()
    assert (reused.jacobian - direct.jacobian).abs().max() <= {torch.float32: 1e-5, torch.float64: 1e-12}[dtype] * scale
    assert lllm.relative_error(direct.output, reused.output) <= 10 * torch.finfo(dtype).eps
    assert reused.relative_error <= MAX_ERROR[dtype]
    assert final_from_cumulative(model, cumulative_jacobians(model, TOK, PROMPT, layers=[0], progress=False)) is None
    assert final_from_cumulative(model, cumulative_jacobians(model, TOK, PROMPT, position=3, progress=False)) is None
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    try:
        assert final_from_cumulative(model, cumulative) is None  # lm_head now reads 2·norm(h): not the same y
    finally:
        handle.remove()


@pytest.mark.parametrize("position", [-1, 3], ids=["last", "middle"])
@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - NO_BATCHED_REPLAY))
def test_forward_sweep_equals_reverse_mode(arch, position):
    """The replayed network (frozen values of one recorded forward, causal token window) against plain batched
    reverse mode (fp64), on every architecture whose record replays on a batch."""
    model = tiny_architecture(arch, torch.float64)
    for compute in (cumulative_jacobians, layerwise_jacobians):
        fwd = compute(model, TOK, PROMPT, position=position, method="forward", chunk_size=20, progress=False)
        rev = compute(model, TOK, PROMPT, position=position, method="reverse", progress=False)
        if position != -1:  # tokens after the read position cannot reach it: exact zero columns
            assert not fwd.jacobian["layer"][:, :, position + 1 :].any()
        assert (fwd.method, rev.method) == ("forward", "reverse")
        for comp in COMPONENTS:
            torch.testing.assert_close(fwd.jacobian[comp], rev.jacobian[comp], rtol=0, atol=1e-10)
            if fwd.bias is not None:
                torch.testing.assert_close(fwd.bias[comp], rev.bias[comp], rtol=0, atol=1e-12)


def test_attention_and_mlp_outputs_add_up_to_the_layer_output():
    """layer ℓ output = layer input + attention out (+ post norm) + MLP out: the components are what they claim."""
    model = tiny_model("llama", torch.float64)
    lw = layerwise_jacobians(model, TOK, PROMPT, progress=False)
    for i in range(2):
        residual = lw.inputs[i, -1]
        torch.testing.assert_close(lw.output["layer"][i], residual + lw.output["attn"][i] + lw.output["mlp"][i])


def test_layer_selection_and_auto_method():
    model = tiny_model("qwen3", torch.float64)
    one = cumulative_jacobians(model, TOK, PROMPT, layers=[0], components=["mlp"], progress=False)
    both = cumulative_jacobians(model, TOK, PROMPT, progress=False)
    assert one.layers == [0] and list(one.jacobian) == ["mlp"]
    torch.testing.assert_close(one.jacobian["mlp"][0], both.jacobian["mlp"][0], rtol=0, atol=1e-12)
    # auto follows the cost model: read at the last of 7 tokens, 32·28 tangent-tokens through 2 layers cost more
    # than 0.7 × 32 rows × 7 tokens back through 1 + 2 layers for 3 components; read at token 1, only 32·3 do
    assert both.method == "reverse"
    assert cumulative_jacobians(model, TOK, PROMPT, position=1, progress=False).method == "forward"


def test_through_norm_off_reads_the_raw_residual_stream():
    model = tiny_model("gemma3", torch.float32)  # float32: the detached forward is bitwise the model's own
    raw = cumulative_jacobians(model, TOK, PROMPT, components=["layer"], through_norm=False, progress=False)
    with torch.no_grad():
        states = model.model(torch.tensor([[int(t) for t in PROMPT.split()]]), output_hidden_states=True)
    assert torch.equal(raw.output["layer"][0], states.hidden_states[1][0, -1])  # layer 0, before any norm
    assert torch.equal(model.model.norm(raw.output["layer"][1]), states.last_hidden_state[0, -1])
    assert max(raw.relative_errors("layer")) < 5e-6


@pytest.mark.parametrize("compute", [cumulative_jacobians, layerwise_jacobians])
def test_forward_sweep_is_exact_when_biases_dwarf_the_columns(compute):
    """Large biases (c ≫ J⁺eₖ) must not cost precision: the basis columns are never computed as (J⁺eₖ + c) − c.

    Found on Qwen2.5's real weights ("The Golden"), where the subtraction left the layer-wise fp32 error at 4e-4.
    """
    model = tiny_model("qwen2", torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 300)
    result = compute(model, TOK, PROMPT, method="forward", progress=False)
    assert result.bias is not None and result.method == "forward"
    for comp in COMPONENTS:
        assert max(result.relative_errors(comp)) <= MAX_ERROR[torch.float32], comp


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_every_buffer_lives_on_the_models_device(device):
    """J⁺, the layer Jacobians, the steering operator's and the matrix-free operator's buffers are where the model is."""
    model = tiny_model("qwen2", torch.float64).to(device)  # q/k/v biases: c is on the path too
    final = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    layers = cumulative_jacobians(model, TOK, PROMPT, method="forward", progress=False)
    assert final.jacobian.device.type == device and layers.jacobian["layer"].device.type == device
    assert final.relative_error <= MAX_ERROR[torch.float64] and max(layers.relative_errors("mlp")) <= 1e-12
    operator = lllm.concept_operator(model, TOK, "3 4 5", layer=0)
    assert operator.jacobian().device.type == device
    with lllm.DetachedOperator.from_prompt(model, TOK, PROMPT) as op:
        u, s, v = lllm.topk_svd(op, 2, block_size=32)  # the whole row space: exact
    assert u.device.type == device
    torch.testing.assert_close(s.cpu(), torch.linalg.svdvals(final.combined.cpu())[:2], rtol=1e-6, atol=0)
