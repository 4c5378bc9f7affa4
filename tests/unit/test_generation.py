"""Greedy generation with per-step detached Jacobians (paper Fig. 2)."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILY_CONFIGS, IdsTokenizer, tiny_model

from lllm.errors import LLLMError, PromptError
from lllm.analyses.generation import generate_with_jacobians, greedy_continuation, next_token_logits

FAMILIES = sorted(FAMILY_CONFIGS)
RECONSTRUCTION_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


class BosTokenizer(IdsTokenizer):
    """IdsTokenizer with a BOS token, like a real tokenizer."""

    bos_token_id = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_jacobians(family, dtype):
    model = tiny_model(family, dtype)
    prompt, n_tokens, k = [1, 7, 9], 4, 3
    result = generate_with_jacobians(model, IdsTokenizer(), prompt, n_tokens, k=k, progress=False)
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=n_tokens, do_sample=False)[0, len(prompt) :]
    assert result.token_ids[: len(reference)] == reference.tolist()
    assert result.token_ids == greedy_continuation(model, prompt, n_tokens)
    assert result.prompt_ids == prompt and len(result.steps) == n_tokens
    for s, step in enumerate(result.steps):
        assert step.input_ids == prompt + result.token_ids[:s]
        jac = step.jacobian
        assert jac.jacobian.shape == (32, len(prompt) + s, 32)
        assert jac.relative_error <= RECONSTRUCTION_TOLERANCE[dtype]
        # the Jacobian's output is the embedding that predicts this step's token (argmax survives soft-capping)
        assert int(model.lm_head(jac.output).argmax()) == step.token_id
        logits = next_token_logits(model, step.input_ids)
        assert step.probability == pytest.approx(float(torch.softmax(logits.double(), -1)[step.token_id]), abs=1e-12)
        assert step.probability == pytest.approx(float(torch.softmax(logits.double(), -1).max()), abs=1e-12)
        assert step.spectrum.shape == (len(step.input_ids), k)
        expected = torch.linalg.svdvals(jac.jacobian.permute(1, 0, 2))[:, :k]
        assert torch.allclose(step.spectrum, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert result.text == " ".join(f"<{i}>" for i in prompt + result.token_ids)


def test_default_prompt_is_bos():
    model = tiny_model("llama", torch.float64)
    result = generate_with_jacobians(model, BosTokenizer(), n_tokens=2, progress=False)
    assert result.prompt_ids == [1]
    assert result.steps[0].input_ids == [1] and result.steps[0].jacobian.jacobian.shape == (32, 1, 32)
    assert result.steps[0].spectrum is None
    assert result.token_ids == greedy_continuation(model, [1], 2)
    assert result.start == "the BOS token '<1>'"


class EndOfTextTokenizer(IdsTokenizer):
    """A tokenizer without a BOS token (Qwen 2.5 and 3 have bos_token: null) but with an end-of-text token."""

    bos_token_id = None
    eos_token_id = 2


def test_a_tokenizer_without_bos_starts_from_its_end_of_text_token_and_says_so():
    model = tiny_model("llama", torch.float64)
    result = generate_with_jacobians(model, EndOfTextTokenizer(), n_tokens=2, progress=False)
    assert result.prompt_ids == [2] and result.token_ids == greedy_continuation(model, [2], 2)
    assert result.start.startswith("the end-of-text token") and "'<2>'" in result.start
    given = generate_with_jacobians(model, EndOfTextTokenizer(), [5, 6], n_tokens=1, progress=False)
    assert given.start == "the prompt '<5> <6>'"


def test_bad_input_is_refused():
    model = tiny_model("llama")
    with pytest.raises(PromptError, match="neither a BOS nor an end-of-text token"):
        generate_with_jacobians(model, IdsTokenizer(), n_tokens=1, progress=False)
    with pytest.raises(PromptError):
        generate_with_jacobians(model, IdsTokenizer(), "  ", progress=False)
    with pytest.raises(LLLMError, match="n_tokens"):
        generate_with_jacobians(model, IdsTokenizer(), [1, 2], n_tokens=0, progress=False)
    with pytest.raises(PromptError, match="positions"):
        greedy_continuation(model, [1] * 120, 9)  # 128 positions
    with pytest.raises(LLLMError, match="k must"):
        generate_with_jacobians(model, IdsTokenizer(), [1, 2], n_tokens=1, k=33, progress=False)
