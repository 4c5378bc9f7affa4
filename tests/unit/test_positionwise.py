"""Replayed MLPs composed into one matrix per token (lllm.kernel.positionwise): engaged where they pay, refused where
a probe shows the module or its layer mixes tokens, and the Jacobians unchanged either way."""

import pytest
import torch

from lllm.kernel.layers import COMPONENTS, cumulative_jacobians, layer_jacobians, layerwise_jacobians
from lllm.kernel.positionwise import worth_composing
from tiny import IdsTokenizer, tiny_model

PROMPT = "1 5 9 17 33 41 60"
TOK = IdsTokenizer()


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """Each token's vector moved to the next token (causal), the first token's slot zero: a token-mixing map."""
    return torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1)


def _model(family: str = "llama"):
    """Deep enough (4 layers) that method="auto" takes the forward sweep for the cumulative maps, so that
    layer_jacobians computes both readouts from one record."""
    extra = {"layer_types": ["sliding_attention", "full_attention"] * 2} if family == "gemma3" else {}
    return tiny_model(family, torch.float64, num_hidden_layers=4, **extra)


def _against_reverse(model):
    """Both readouts from one record, against plain reverse mode through the linearized forward (cumulative)
    and the layer-wise basis sweep, fp64."""
    both = layer_jacobians(model, TOK, PROMPT, progress=False)
    assert (both["cumulative"].method, both["layerwise"].method) == ("forward", "reverse")
    cumulative = cumulative_jacobians(model, TOK, PROMPT, method="reverse", progress=False)
    layerwise = layerwise_jacobians(model, TOK, PROMPT, method="forward", progress=False)
    for comp in COMPONENTS:
        torch.testing.assert_close(both["cumulative"].jacobian[comp], cumulative.jacobian[comp], rtol=0, atol=1e-10)
        torch.testing.assert_close(both["layerwise"].jacobian[comp], layerwise.jacobian[comp], rtol=0, atol=1e-10)
    return both


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "phi3", "olmo2"])
def test_composed_mlps_give_the_jacobians_of_the_recorded_ops(family):
    model = _model(family)
    both = _against_reverse(model)
    assert both["cumulative"].meta["composed_mlps"] == model.config.num_hidden_layers  # every MLP composed


def test_an_mlp_that_mixes_tokens_is_not_composed():
    """A module named as the MLP that adds the previous token's input fails the probe and runs as recorded."""
    model = _model()
    mlp = model.model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda module, args, out: out + 0.5 * _shifted(args[0]))
    try:
        both = _against_reverse(model)
    finally:
        handle.remove()
    assert both["cumulative"].meta["composed_mlps"] == model.config.num_hidden_layers - 1


def test_a_layer_that_reads_other_tokens_mlp_outputs_keeps_their_gradients():
    """Where a layer mixes its MLP's outputs across tokens after the MLP, the layer-wise VJPs must run through
    every token's map (the probe finds it): the Jacobians still equal the basis sweep's."""
    model = _model()
    layer, captured = model.model.layers[1], {}
    handles = [layer.mlp.register_forward_hook(lambda module, args, out: captured.__setitem__("mlp", out)),
               layer.register_forward_hook(lambda module, args, out: (out[0] if isinstance(out, tuple) else out)
                                           + 0.5 * _shifted(captured["mlp"]))]
    try:
        _against_reverse(model)
    finally:
        for handle in handles:
            handle.remove()


def test_composing_is_skipped_where_it_would_not_pay():
    cpu = torch.device("cpu")
    assert worth_composing(7, 7, 30, 576, 576, torch.float32, cpu)
    assert not worth_composing(7, 2, 30, 576, 576, torch.float32, cpu)  # few tangents reach each token
    assert not worth_composing(7, 7, 30, 576, 576, torch.float16, cpu)  # half precision keeps the recorded ops
    assert not worth_composing(10**6, 10**6, 30, 576, 576, torch.float32, cpu)  # the maps would not fit


def test_an_mlp_with_a_users_hook_runs_as_recorded():
    """A forward hook on the MLP module itself would act twice on a composed map (once inside it, once on its
    output): such a module is not composed, and a hook on a module inside the MLP acts once either way."""
    model = _model()
    handles = [model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: 2 * out),
               model.model.layers[1].mlp.up_proj.register_forward_hook(lambda module, args, out: 3 * out)]
    try:
        both = _against_reverse(model)
    finally:
        for handle in handles:
            handle.remove()
    assert both["cumulative"].meta["composed_mlps"] == model.config.num_hidden_layers - 1


def _own_token_sets(monkeypatch) -> list[set]:
    """Spy on the probe of the layer-wise VJPs: which stand-ins each layer reads at the read position alone."""
    from lllm.kernel import readouts

    seen, probe = [], readouts.own_token_modules

    def spy(*args, **kwargs):
        seen.append(probe(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(readouts, "own_token_modules", spy)
    return seen


def test_the_vjps_keep_the_output_projection_and_the_mlp_to_the_read_token(monkeypatch):
    """o_proj and the composed MLP pass the probe (nothing mixes tokens after them); v_proj does not (attention mixes
    its output), and q_proj and k_proj, which feed only the frozen scores, are not stand-ins at all."""
    model = _model()
    seen = _own_token_sets(monkeypatch)
    _against_reverse(model)
    assert [{type(m).__name__ if m is not layer.self_attn.o_proj else "o_proj" for m in own}
            for own, layer in zip(seen, model.model.layers)] == [{"o_proj", "LlamaMLP"}] * len(model.model.layers)


def test_a_layer_that_reads_other_tokens_output_projection_keeps_their_gradients(monkeypatch):
    """Where the attention mixes o_proj's outputs across tokens after it, the probe refuses o_proj in that layer and its
    VJPs run through every token's rows: the Jacobians still equal the basis sweep's."""
    model = _model()
    attention, captured = model.model.layers[2].self_attn, {}
    handles = [attention.o_proj.register_forward_hook(lambda module, args, out: captured.__setitem__("o", out)),
               attention.register_forward_hook(lambda module, args, out: (out[0] + 0.5 * _shifted(captured["o"]),
                                                                          *out[1:]))]
    seen = _own_token_sets(monkeypatch)
    try:
        _against_reverse(model)
    finally:
        for handle in handles:
            handle.remove()
    assert attention.o_proj not in seen[2] and model.model.layers[2].mlp in seen[2]
    assert model.model.layers[1].self_attn.o_proj in seen[1]


def test_a_linear_with_a_forward_of_its_own_runs_it(monkeypatch):
    """An instance's own forward (a wrapper that scales the weight, as a quantization or adapter patch would) is what
    the record ran: such a Linear is no stand-in, and every readout runs the wrapper."""
    model = _model()
    o_proj = model.model.layers[1].self_attn.o_proj
    o_proj.forward = lambda hidden: torch.nn.functional.linear(hidden, 2 * o_proj.weight, o_proj.bias)
    seen = _own_token_sets(monkeypatch)
    try:
        _against_reverse(model)
    finally:
        del o_proj.forward
    assert o_proj not in seen[1] and model.model.layers[0].self_attn.o_proj in seen[0]
