"""Eq. 16 steering: the operator is the concept's J⁺_L (+ c_L), λ = 1 is the untouched model."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILY_CONFIGS, IdsTokenizer, tiny_model

from lllm.errors import LLLMError, PromptError
from lllm.analyses.generation import greedy_continuation, next_token_logits
from lllm.kernel.jacobian import embed, relative_error
from lllm.kernel.layers import cumulative_jacobians
from lllm.kernel.oplevel import detached
from lllm.analyses.steering import (
    _layer_output, concept_operator, default_layer, lambda_sweep, steer, steered_activation, steered_continuation,
    steered_logits, sweep_table,
)

FAMILIES = sorted(FAMILY_CONFIGS)
DTYPES = [torch.float32, torch.float64]
# The reconstruction of a complete linearization is at rounding level: ~1e-7 in float32, ~1e-16 in float64.
RECONSTRUCTION_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
CONCEPT = [5, 17, 33, 8, 40, 61]
LONG_PROMPT = [9, 12, 70, 3, 44, 21, 15, 80, 6]  # longer than the concept: the first rows are not steered
SHORT_PROMPT = [9, 12, 70]  # shorter than the concept: the concept's first positions get zero input
TOKENIZER = IdsTokenizer()


def _operator_times(jac: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """J⁺_L x + c for x right-aligned with the concept: (W, d) rows for W = min(T, T_c)."""
    width = min(x.shape[0], jac.shape[0])
    rows = torch.einsum("pdqe,qe->pd", jac[-width:, :, -width:], x[-width:])
    return rows if bias is None else rows + bias[-width:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_one_is_normal_generation(family, dtype):
    model = tiny_model(family, dtype)
    prompt = [1, 7, 9, 30]
    results = lambda_sweep(model, TOKENIZER, CONCEPT, prompt, lams=(1.0, 0.0), n_tokens=6)
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    normal = results[0].normal_ids
    assert normal[: len(reference)] == reference  # the plain loop is greedy generation (generate may stop at EOS)
    assert results[0].lam == 1.0 and results[0].steered_ids == normal
    assert not results[0].changed
    assert len(results[1].steered_ids) == 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_operator_is_the_concept_jacobian(family, dtype):
    """J⁺_L reconstructs f_L(x_steer) at every concept position, so λ = 0 on the concept gives f_L back."""
    model = tiny_model(family, dtype)
    operator = concept_operator(model, TOKENIZER, CONCEPT, layer=0)
    jac = operator.jacobian(chunk_size=64)
    tol = RECONSTRUCTION_TOLERANCE[dtype]
    reconstructed = _operator_times(jac, operator.inputs, operator.bias)
    assert relative_error(operator.output, reconstructed) <= tol
    activation = steered_activation(operator, CONCEPT, 0.0)  # what layers 1… receive
    assert relative_error(activation, reconstructed) <= tol
    n = operator.n_tokens
    # causal: row p does not depend on later inputs; exactly, unless subtracting c_L leaves rounding
    allowed = 0.0 if operator.bias is None else tol * jac.abs().max()
    for p in range(n):
        assert jac[p, :, : p + 1].abs().max() > 0
        if p < n - 1:
            assert jac[p, :, p + 1 :].abs().max() <= allowed


@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_zero_on_the_concept_is_the_model_bit_for_bit_in_float32(family):
    """In float32 the detached forward repeats the model's op order, so the replaced activation is exact."""
    model = tiny_model(family, torch.float32)
    operator = concept_operator(model, TOKENIZER, CONCEPT, layer=0)
    assert torch.equal(steered_logits(operator, CONCEPT, 0.0), next_token_logits(model, CONCEPT))
    assert not torch.equal(steered_logits(operator, LONG_PROMPT, 0.0), next_token_logits(model, LONG_PROMPT))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", [LONG_PROMPT, SHORT_PROMPT], ids=["longer", "shorter"])
def test_matrix_free_operator_on_a_new_prompt(family, prompt):
    """The replayed map applied to new embeddings equals the materialized J⁺_L (+ c), right-aligned."""
    dtype = torch.float64
    model = tiny_model(family, dtype)
    operator = concept_operator(model, TOKENIZER, CONCEPT, layer=1)
    x_new = embed(model, prompt)
    expected = _operator_times(operator.jacobian(), x_new, operator.bias)
    steer_rows = operator.apply(x_new)
    assert steer_rows.shape == expected.shape
    assert relative_error(expected, steer_rows) <= RECONSTRUCTION_TOLERANCE[dtype]
    # eq. 16 at λ = 0.3 on the aligned rows; rows before the window keep f_L(x_new) exactly
    with torch.no_grad():
        f_new = _layer_output(model, 1, x_new[None])[0]
    mixed = steered_activation(operator, prompt, 0.3)
    width = steer_rows.shape[0]
    assert torch.equal(mixed[: len(prompt) - width], f_new[: len(prompt) - width])
    assert torch.allclose(mixed[-width:], 0.3 * f_new[-width:] + 0.7 * expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_operator_matches_cumulative_jacobian_at_every_position(family):
    """The concept operator agrees with lllm.kernel.layers' cumulative J⁺ (no final norm), computed independently."""
    model = tiny_model(family, torch.float64)
    operator = concept_operator(model, TOKENIZER, CONCEPT, layer=1)
    jac = operator.jacobian()
    for position in (0, 3, -1):
        layers = cumulative_jacobians(model, TOKENIZER, CONCEPT, layers=[1], components=("layer",),
                                      position=position, through_norm=False, method="reverse", progress=False)
        reference = layers.jacobian["layer"][0]  # (d, T, d)
        assert torch.allclose(jac[position], reference, rtol=0, atol=1e-12 * reference.abs().max())


def test_bias_term_is_needed_for_qwen2():
    """Qwen 2's v bias makes the map affine: J⁺_L x alone misses f_L, J⁺_L x + c_L does not."""
    model = tiny_model("qwen2", torch.float64)
    operator = concept_operator(model, TOKENIZER, CONCEPT, layer=1)
    assert operator.bias is not None and operator.bias.abs().max() > 0
    jac = operator.jacobian()
    assert relative_error(operator.output, _operator_times(jac, operator.inputs, None)) > 1e-3
    assert relative_error(operator.output, _operator_times(jac, operator.inputs, operator.bias)) <= 1e-12
    assert concept_operator(tiny_model("llama", torch.float64), TOKENIZER, CONCEPT).bias is None


def test_jvp_through_the_detached_network_agrees():
    """An independent route: a forward-mode JVP of the (unreplayed) detached network at x_steer."""
    model = tiny_model("olmo2", torch.float64)
    operator = concept_operator(model, TOKENIZER, CONCEPT, layer=1)
    x_new = embed(model, LONG_PROMPT)[-operator.n_tokens :]
    with detached(model), torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(operator.inputs[None], x_new[None])
        tangent = torch.autograd.forward_ad.unpack_dual(_layer_output(model, 1, dual)).tangent[0]
    assert relative_error(tangent, operator.apply(x_new)) <= 1e-12


def test_steering_changes_generation_and_steer_matches_sweep():
    model = tiny_model("llama", torch.float64)
    prompt = [1, 7, 9, 30]
    single = steer(model, TOKENIZER, CONCEPT, prompt, lam=0.0, n_tokens=5)
    swept = lambda_sweep(model, TOKENIZER, CONCEPT, prompt, lams=(0.0,), n_tokens=5)[0]
    assert single == swept
    assert single.layer == default_layer(model) == 1
    operator = concept_operator(model, TOKENIZER, CONCEPT)
    assert steered_continuation(operator, prompt, 0.0, 5) == single.steered_ids
    assert single.changed  # measured: this tiny model's continuation does change at λ = 0
    assert single.normal_ids == greedy_continuation(model, prompt, 5)
    table = sweep_table([single])
    assert "| normal |" in table and "| 0 |" in table


def test_default_layer_is_two_thirds_of_the_depth():
    assert default_layer(tiny_model("llama", num_hidden_layers=30)) == 20
    assert default_layer(tiny_model("llama", num_hidden_layers=36)) == 24
    assert default_layer(tiny_model("llama", num_hidden_layers=1)) == 0


def test_bad_input_is_refused():
    model = tiny_model("llama")
    with pytest.raises(LLLMError, match="layer"):
        concept_operator(model, TOKENIZER, CONCEPT, layer=2)
    with pytest.raises(PromptError):
        concept_operator(model, TOKENIZER, "   ")
    with pytest.raises(LLLMError, match="finite"):
        steer(model, TOKENIZER, CONCEPT, [1, 2], lam=float("nan"))
    with pytest.raises(LLLMError, match="n_tokens"):
        steer(model, TOKENIZER, CONCEPT, [1, 2], lam=0.5, n_tokens=0)
    with pytest.raises(LLLMError):
        sweep_table([])


class BosTokenizer(IdsTokenizer):
    """Adds a BOS token (id 1) to every prompt, as Gemma's, Llama 3's and DeepSeek's tokenizers do."""

    def __call__(self, text: str):
        return {"input_ids": [1] + super().__call__(text)["input_ids"]}

    def decode(self, ids):
        return "".join("<bos>" if i == 1 else f" w{i}" for i in ids)


def test_table4_continuations_start_with_the_first_generated_token_after_a_bos():
    """The decoded prompt holds the tokenizer's <bos>: slicing by the prompt string's length cut the continuation
    in the middle of a token ("e the…" on Gemma); it is what follows the decoded prompt ids."""
    from lllm.apps.steering_tables import continuations_table

    prompt = "3 4 5"
    sweep = lambda_sweep(tiny_model("llama", torch.float64), BosTokenizer(), CONCEPT, prompt, lams=(1.0, 0.0),
                         n_tokens=3)
    table = continuations_table({prompt: sweep})
    assert table.loc[(prompt, "normal"), "continuation"] == "".join(f" w{i}" for i in sweep[0].normal_ids)
    for r in sweep:
        assert table.loc[(prompt, f"{r.lam:g}"), "continuation"] == "".join(f" w{i}" for i in r.steered_ids)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_continuations_are_the_step_by_step_steered_logits(dtype):
    model = tiny_model("llama", dtype)
    operator, prompt = concept_operator(model, TOKENIZER, CONCEPT), [1, 7, 9, 30]
    for lam in (0.3, 0.0):  # 0.3 is not a float32 number: the batched mix must use λ as a Python float does
        sequence = list(prompt)
        for _ in range(5):
            sequence.append(int(steered_logits(operator, sequence, lam).argmax()))
        assert steered_continuation(operator, prompt, lam, 5) == sequence[len(prompt):]
    with pytest.raises(PromptError, match="outside the vocabulary"):
        steered_continuation(operator, [1, 10**6], 0.5, 2)
    with pytest.raises(PromptError, match="at least one"):
        steered_continuation(operator, [], 0.5, 2)
