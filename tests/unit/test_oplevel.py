"""The op-level linearization on every tested architecture, its audit, and the cases it must refuse."""

import math

import pytest
import torch
import transformers as T

import lllm
from lllm.errors import LinearizationError
from lllm.kernel import oplevel, optable
from lllm.kernel.layers import COMPONENTS
from tiny import (
    ARCHITECTURES, COMMON, FAMILY_CONFIGS, IdsTokenizer, check_architecture, lm_head_reads, randomize,
    tiny_architecture,
)

PROMPT = "1 5 9 17 33 41 60 77 80 12"  # 10 tokens: longer than the sliding windows of 4
IDS = [int(t) for t in PROMPT.split()]
TOK = IdsTokenizer()
MAX_ERROR = {torch.float32: 5e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_is_exact_bitwise_and_reads_what_lm_head_reads(arch):
    """The final-J⁺ exactness test on tiny models (tests/integration/test_real_models.py: on the embedded ones)."""
    row = check_architecture(lambda dtype: tiny_architecture(arch, dtype), IDS)
    assert row["bitwise_forward"]  # (a) the float32 forward, every rewrite active, is the model's own bit for bit
    # (b) exact to rounding; in float64 lllm avoids transformers' float32 norm and softmax, so ~1e-15, not ~1e-8
    assert row["fp32"] <= MAX_ERROR[torch.float32] and row["fp64"] <= 1e-13
    assert row["ordinary"] >= 1e-2  # (c) the ordinary Jacobian does not reconstruct y
    assert row["y_is_what_lm_head_reads"]  # (e)
    assert row["verdict"] == "exact" and row["frozen_ops"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_is_ordinary_again_after_exit_and_c_is_independent_of_y(arch):
    model = tiny_architecture(arch, torch.float64)
    before = lllm.ordinary_jacobian(model, TOK, PROMPT, progress=False).jacobian
    result = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    # (d) after exit the model is ordinary again: same Jacobian, no hooks, autograd.Function restored
    assert torch.equal(lllm.ordinary_jacobian(model, TOK, PROMPT, progress=False).jacobian, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())  # no instance-level forward left behind
    assert "apply" in torch.autograd.Function.__dict__ and not getattr(model, "_lllm_detached", False)
    # c comes from a JVP over the additive parameters alone, and it matters where there are any
    has_additive = bool(oplevel.additive_parameters(model))
    assert (result.bias is not None) == has_additive
    if has_additive:
        linear_part = torch.einsum("otd,td->o", result.jacobian, result.inputs)
        assert lllm.relative_error(result.output, linear_part) > 1e-6


def test_gated_mlp_split_is_reported():
    """(Both splits exact, with different J⁺: test_families.)"""
    model = tiny_architecture("llama", torch.float64)
    eq8 = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    gate = lllm.detached_jacobian(model, TOK, PROMPT, progress=False, mlp_split="gate")
    assert "paper eq. 8" in eq8.meta["linearization"]["split"]
    assert "gate live" in gate.meta["linearization"]["split"]
    oss = lllm.detached_jacobian(tiny_architecture("gpt_oss", torch.float64), TOK, PROMPT, progress=False)
    assert "non-linear factor frozen, activation live" in oss.meta["linearization"]["split"]  # (up + 1)·glu


def _llama_float64_reference(model, x: torch.Tensor) -> torch.Tensor:
    """J⁺ of a tiny Llama computed independently in float64: explicit detached softmax, rsqrt and SiLU, no
    transformers forward (only its weights and the rotary inverse frequencies)."""
    cfg, decoder = model.config, model.get_decoder()
    n_tokens, heads, kv, hs = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rotary = decoder.rotary_emb  # its inverse frequencies (llama3 scaling applied at init), in float64
    angles = torch.arange(n_tokens, dtype=torch.float64)[:, None] * rotary.inv_freq.to(torch.float64)[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # (T, hs)
    cos, sin = cos * rotary.attention_scaling, sin * rotary.attention_scaling

    def norm(h, w, eps):  # (T, d)
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach())

    def rope(t):  # (H, T, hs)
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    def forward(h):  # (T, d) -> (d,)
        mask = torch.full((n_tokens, n_tokens), -math.inf, dtype=torch.float64).triu(1)
        for layer in decoder.layers:
            a = norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            att = layer.self_attn
            q = rope((a @ att.q_proj.weight.T).view(n_tokens, heads, hs).transpose(0, 1))
            k = rope((a @ att.k_proj.weight.T).view(n_tokens, kv, hs).transpose(0, 1)).repeat_interleave(heads // kv, 0)
            v = (a @ att.v_proj.weight.T).view(n_tokens, kv, hs).transpose(0, 1).repeat_interleave(heads // kv, 0)
            p = torch.softmax(q @ k.transpose(1, 2) * hs**-0.5 + mask, -1).detach()  # float64 softmax
            h = h + (p @ v).transpose(0, 1).reshape(n_tokens, -1) @ att.o_proj.weight.T
            m = norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            mlp = layer.mlp
            gate = m @ mlp.gate_proj.weight.T
            h = h + (torch.nn.functional.silu(gate).detach() * (m @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        return norm(h, decoder.norm.weight, decoder.norm.variance_epsilon)[-1]

    return torch.autograd.functional.jacobian(forward, x)  # (d, T, d)


def test_float64_jacobian_agrees_with_an_independent_float64_computation():
    model = tiny_architecture("llama", torch.float64)
    result = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    reference = _llama_float64_reference(model, result.inputs)
    assert ((result.jacobian - reference).norm() / reference.norm()).item() <= 1e-12


def test_sdpa_is_exact_and_equals_eager():
    for dtype in (torch.float32, torch.float64):
        eager = lllm.detached_jacobian(tiny_architecture("llama", dtype), TOK, PROMPT, progress=False)
        sdpa_model = tiny_architecture("llama", dtype, attn_implementation="sdpa")
        sdpa = lllm.detached_jacobian(sdpa_model, TOK, PROMPT, progress=False)
        assert sdpa.relative_error <= MAX_ERROR[dtype]
        assert sdpa.meta["linearization"]["frozen_ops"].get("scaled_dot_product_attention")
        # two kernels compute P (fused sdpa, eager matmul + softmax): equal to their dtype's rounding
        gap = ((sdpa.jacobian - eager.jacobian).norm() / eager.jacobian.norm()).item()
        assert gap <= (1e-5 if dtype == torch.float32 else 1e-12), gap


def _tiny_gemma3_conditional_generation(dtype):
    text = T.Gemma3TextConfig(**{**COMMON, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                                 "attn_logit_softcapping": 20.0, "query_pre_attn_scalar": 8})
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=4)
    config = T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                            image_token_index=95, boi_token_index=93, eoi_token_index=94)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(0)
    model = T.Gemma3ForConditionalGeneration(config).to(dtype).eval()
    return randomize(model, gemma_norms=True).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_multimodal_wrapper_with_text_input_is_exact(dtype):
    model = _tiny_gemma3_conditional_generation(dtype)
    result = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    assert result.relative_error <= MAX_ERROR[dtype]
    assert result.jacobian.shape == (32, 10, 32)
    if dtype == torch.float32:
        assert torch.equal(result.output, lm_head_reads(model, IDS))


# -- the cases that were silently wrong under the class-name adapters ---------------------------------------------


def _exact_and_repeatable(model):
    """Exact: the output is what lm_head reads, J⁺ rebuilds it, and two calls agree."""
    first = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    second = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    assert torch.equal(first.output, lm_head_reads(model, IDS))
    assert first.relative_error <= MAX_ERROR[torch.float32]
    assert torch.equal(first.jacobian, second.jacobian)
    return first


def _layer_readouts_agree(model, final):
    """The layer readouts (forward sweep and reverse mode) see the same forward: the last layer's map is J⁺."""
    for method in ("forward", "reverse"):
        last = lllm.cumulative_jacobians(model, TOK, PROMPT, layers=[-1], components=["layer"], method=method,
                                         progress=False)
        assert ((last.jacobian["layer"][0] - final.jacobian).norm() / final.jacobian.norm()).item() <= 1e-6, method


def test_users_own_mlp_forward_with_a_sine_gate_is_linearized_as_it_runs():
    model = tiny_architecture("llama")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(torch.sin(mlp.gate_proj(x)) * mlp.up_proj(x))
    result = _exact_and_repeatable(model)
    assert result.meta["linearization"]["frozen_ops"]["sin"] >= 1
    _layer_readouts_agree(model, result)


def test_attention_submodule_left_in_training_mode_is_refused():
    model = tiny_architecture("llama")
    model.model.layers[1].self_attn.train()
    with pytest.raises(lllm.UnsupportedModelError, match="model.layers.1.self_attn.*training"):
        lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    with pytest.raises(lllm.UnsupportedModelError, match="training"):
        with lllm.detached(model):
            pass


def test_in_place_tanh_in_a_users_mlp_is_refused_at_its_line():
    model = tiny_architecture("llama")
    mlp = model.model.layers[0].mlp

    def forward(x):
        hidden = mlp.gate_proj(x)
        hidden.tanh_()  # in place on a live tensor
        return mlp.down_proj(hidden * mlp.up_proj(x))

    mlp.forward = forward
    with pytest.raises(lllm.CoverageError, match=r"'tanh_'.*model.layers.0.mlp.*test_oplevel.py:\d+"):
        lllm.detached_jacobian(model, TOK, PROMPT, progress=False)


class _CubeGate(torch.autograd.Function):
    """A custom activation with its own (ordinary) backward: x·tanh(x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (torch.tanh(x) + x * (1 - torch.tanh(x) ** 2))


class _Activation(torch.nn.Module):
    """A user's activation module wrapping any function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_custom_autograd_function_activation_is_decomposed_and_exact():
    model = tiny_architecture("llama")
    mlp = model.model.layers[0].mlp
    mlp.act_fn = _Activation(_CubeGate.apply).eval()
    _exact_and_repeatable(model)
    assert torch.autograd.Function.__dict__["apply"].__func__ is not None  # restored


def test_forward_hook_applying_tanh_to_a_layer_output_is_linearized():
    model = tiny_architecture("llama")
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: torch.tanh(out))
    try:
        result = _exact_and_repeatable(model)
        assert result.meta["linearization"]["frozen_ops"]["tanh"] >= 1
        _layer_readouts_agree(model, result)
    finally:
        handle.remove()


# -- negative controls: the audit must catch a wrong op table -----------------------------------------------------


def test_removing_softmax_from_the_op_table_raises_at_the_modeling_line(monkeypatch):
    monkeypatch.setattr(optable, "FREEZING", optable.FREEZING - {"softmax"})
    with pytest.raises(lllm.CoverageError, match=r"'softmax'.*self_attn.*modeling_llama\.py:\d+"):
        lllm.detached_jacobian(tiny_architecture("llama"), TOK, PROMPT, progress=False)


def test_declaring_gelu_linear_is_caught_by_the_self_check(monkeypatch):
    monkeypatch.setattr(optable, "ACTIVATIONS", optable.ACTIVATIONS - {"gelu"})
    monkeypatch.setattr(optable, "PASS", optable.PASS | {"gelu"})
    with pytest.raises(LinearizationError, match="reconstructs it only"):
        lllm.detached_jacobian(tiny_architecture("gpt_neox"), TOK, PROMPT, progress=False)


def test_an_unknown_op_on_a_live_tensor_is_refused():
    model = tiny_architecture("llama")
    mlp = model.model.layers[0].mlp
    mlp.act_fn = _Activation(torch.special.i0).eval()  # no entry in the op table
    with pytest.raises(lllm.CoverageError, match="'(special_)?i0'.*not in lllm's op table"):
        lllm.detached_jacobian(model, TOK, PROMPT, progress=False)


def test_an_additive_constant_that_is_not_a_bias_is_refused():
    model = tiny_architecture("llama")
    layer = model.model.layers[0]
    handle = layer.register_forward_hook(lambda m, a, out: out + 0.5)  # x + const: affine, but not declared
    try:
        with pytest.raises(lllm.CoverageError, match="tagged 'N'"):
            lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    finally:
        handle.remove()


# -- layer-by-layer readouts of the architectures beyond the seven families (those are in test_layers) ---------------------

OTHER_ARCHITECTURES = sorted(set(ARCHITECTURES) - set(FAMILY_CONFIGS))  # the families are in test_layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", OTHER_ARCHITECTURES)
def test_layer_readouts_of_any_decoder_are_exact_and_end_at_the_final_jacobian(arch, dtype):
    model = tiny_architecture(arch, dtype)
    components = ["layer", "attn"] + ([] if arch == "opt" else ["mlp"])  # OPT's MLP is inline, not a module
    cumulative = lllm.cumulative_jacobians(model, TOK, PROMPT, components=components, progress=False)
    layerwise = lllm.layerwise_jacobians(model, TOK, PROMPT, components=components, progress=False)
    for result in (cumulative, layerwise):
        assert result.method == "reverse" and result.layers == [0, 1]
        for comp in components:
            assert max(result.relative_errors(comp)) <= MAX_ERROR[dtype], (result.kind, comp)
    assert (cumulative.bias is not None) == bool(oplevel.additive_parameters(model))
    final = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    gap = (cumulative.jacobian["layer"][-1] - final.jacobian).norm() / final.jacobian.norm()
    assert gap <= (1e-6 if dtype == torch.float32 else 1e-12)
    assert torch.equal(cumulative.output["layer"][-1], final.output)


def test_layer_readouts_refuse_what_the_op_level_path_cannot_give():
    model = tiny_architecture("mixtral")
    with pytest.raises(lllm.UnsupportedModelError, match="forward sweep.*MoE"):
        lllm.cumulative_jacobians(model, TOK, PROMPT, method="forward", progress=False)
    assert lllm.cumulative_jacobians(model, TOK, PROMPT, method="auto", progress=False).method == "reverse"
    with pytest.raises(lllm.UnsupportedModelError, match="'mlp' submodule"):
        lllm.layerwise_jacobians(tiny_architecture("opt"), TOK, PROMPT, components=["mlp"], progress=False)


def test_the_per_prompt_analysis_runs_on_a_decoder_without_an_adapter():
    analysis = lllm.analyze(tiny_architecture("gpt2"), TOK, IDS[:7], progress=False)
    assert analysis.meta["relative_error"] <= MAX_ERROR[torch.float32]
    assert analysis.meta["methods"] == {"cumulative": "reverse", "layerwise": "reverse"}
    assert all(max(errors) <= MAX_ERROR[torch.float32] for errors in analysis.meta["layer_errors"].values())


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "falcon", "mixtral"])
def test_steering_operator_of_any_decoder_matches_its_cumulative_jacobian(arch):
    """The concept operator (op-level recording, replayed on basis vectors in token windows) against reverse mode."""
    from lllm.analyses.steering import concept_operator

    model = tiny_architecture(arch, torch.float64)
    operator = concept_operator(model, TOK, "1 5 9 17 33", layer=1)
    torch.testing.assert_close(operator.apply(operator.inputs), operator.output, rtol=0, atol=1e-12)
    if arch == "mixtral":  # MoE routing: one input at a time only
        with pytest.raises(lllm.UnsupportedModelError, match="one input at a time"):
            operator.jacobian()
        return
    jac = operator.jacobian()
    for position in (0, 3, -1):
        reference = lllm.cumulative_jacobians(model, TOK, "1 5 9 17 33", layers=[1], components=("layer",),
                                              position=position, through_norm=False, method="reverse",
                                              progress=False).jacobian["layer"][0]
        assert torch.allclose(jac[position], reference, rtol=0, atol=1e-12 * reference.abs().max())


# -- found by review: each was a silently wrong number on some path, and must now be exact or refused -------------


def _wrap_mlp(model, forward):
    """Layer 0's MLP replaced by forward(original_mlp_forward, x)."""
    mlp = model.model.layers[0].mlp
    original = mlp.forward
    mlp.forward = lambda x: forward(original, x)
    return model


def _every_path_is_exact_or_refused(model):
    """The final J⁺, both layer sweeps and the steering operator: an exact result or an lllm error, never a wrong one."""
    from lllm.analyses.steering import concept_operator

    final = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    for method in ("forward", "reverse", "auto"):
        try:
            last = lllm.cumulative_jacobians(model, TOK, PROMPT, layers=[-1], components=["layer"], method=method,
                                             progress=False)
        except lllm.UnsupportedModelError:
            assert method == "forward", method  # auto falls back to reverse mode
            continue
        assert ((last.jacobian["layer"][0] - final.jacobian).norm() / final.jacobian.norm()).item() <= 1e-10
    try:
        operator = concept_operator(model, TOK, PROMPT, layer=1)
    except lllm.UnsupportedModelError:
        return
    torch.testing.assert_close(operator.apply(operator.inputs), operator.output, rtol=0, atol=1e-10)
    try:
        jac = operator.jacobian()
    except lllm.UnsupportedModelError:
        return
    reference = lllm.cumulative_jacobians(model, TOK, PROMPT, layers=[1], components=["layer"], through_norm=False,
                                          method="reverse", progress=False).jacobian["layer"][0]
    assert torch.allclose(jac[-1], reference, rtol=0, atol=1e-10 * reference.abs().max())


def test_in_place_write_after_a_view_is_replayed():
    def forward(original, x):
        out = original(x)
        view = out[..., :]
        out.mul_(2.0)  # in place, after the view was taken: the view sees it
        return view

    _every_path_is_exact_or_refused(_wrap_mlp(tiny_architecture("llama", torch.float64), forward))


def test_a_frozen_comparison_broadcast_up_is_replayed_at_its_own_shape():
    def forward(original, x):
        mlp = original.__self__
        mask = torch.lt(torch.zeros(1, 1, 1, dtype=x.dtype), mlp.gate_proj(x))  # broadcast up to (B, T, I)
        return mlp.down_proj(mask * mlp.up_proj(x))

    _every_path_is_exact_or_refused(_wrap_mlp(tiny_architecture("llama", torch.float64), forward))


def test_threshold_with_a_nonzero_value_is_not_rewritten_as_an_activation():
    def forward(original, x):
        mlp = original.__self__
        return mlp.down_proj(torch.threshold(mlp.gate_proj(x), 0.0, 1.0) * mlp.up_proj(x))  # f(0) = 1

    model = _wrap_mlp(tiny_architecture("llama", torch.float64), forward)
    result = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    assert "threshold" in result.meta["linearization"]["frozen_ops"]  # frozen whole (F), not h·g(h)
    assert result.relative_error <= 1e-12


def test_a_torch_ops_overload_on_a_live_tensor_is_refused():
    def forward(original, x):
        return original(x) * torch.ops.aten.mean.dim(x, [-1], True)

    model = _wrap_mlp(tiny_architecture("llama", torch.float64), forward)
    with pytest.raises(lllm.CoverageError, match="torch.ops.aten.mean.dim"):
        lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    with pytest.raises(lllm.CoverageError, match="torch.ops.aten.mean.dim"):
        lllm.cumulative_jacobians(model, TOK, PROMPT, method="forward", progress=False)


def test_tokens_flattened_with_the_batch_are_not_cut_as_a_token_window():
    """OPT's MLP runs on (B·T', d): a window cut there would be wrong, so the forward sweep is refused."""
    model = tiny_architecture("opt", torch.float64)
    with pytest.raises(lllm.UnsupportedModelError, match="forward sweep"):
        lllm.cumulative_jacobians(model, TOK, PROMPT, components=["layer"], position=3, method="forward",
                                  chunk_size=2, progress=False)
    auto = lllm.cumulative_jacobians(model, TOK, PROMPT, components=["layer"], position=3, method="auto",
                                     chunk_size=2, progress=False)
    assert auto.method == "reverse" and max(auto.relative_errors("layer")) <= 1e-12


def test_a_module_shared_by_two_layers_is_not_replayed_with_the_other_layers_values():
    model = tiny_architecture("llama", torch.float64)
    model.model.layers[1].mlp = model.model.layers[0].mlp
    for method in ("forward", "reverse"):
        try:
            result = lllm.layerwise_jacobians(model, TOK, PROMPT, method=method, progress=False)
        except lllm.UnsupportedModelError:
            assert method == "forward"
            continue
        assert max(max(result.relative_errors(c)) for c in COMPONENTS) <= 1e-12
