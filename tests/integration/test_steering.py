"""Eq. 16 steering on SmolLM2-135M: the Table 4 measurement, shortened."""

from __future__ import annotations

import torch

from lllm.analyses.steering import _layer_output, concept_operator, lambda_sweep, sweep_table
from lllm.kernel.jacobian import embed, relative_error
from lllm.kernel.oplevel import detached

RECONSTRUCTION_TOLERANCE = 1e-5  # float32

SMOL_CONCEPT = "The bridge out of Marin is the Golden"
SMOL_PROMPTS = ["I'm going to arizona to see the", "Here is a painting of the", "I went to new york to see the"]


def test_smollm2_lambda_sweep(smollm2):
    model, tokenizer = smollm2
    n_tokens = 4  # the full Table 4 sweep (3 prompts × 6 λ × 8 tokens) is the table4 notebook's job
    operator = concept_operator(model, tokenizer, SMOL_CONCEPT)
    assert operator.layer == 20 and operator.bias is None
    # the replayed operator is the detached network's Jacobian at the concept: check against a JVP, float32
    x_new = embed(model, tokenizer(SMOL_PROMPTS[0])["input_ids"])[-operator.n_tokens :]
    with detached(model), torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(operator.inputs[None], x_new[None])
        tangent = torch.autograd.forward_ad.unpack_dual(_layer_output(model, operator.layer, dual)).tangent[0]
    assert relative_error(tangent, operator.apply(x_new)) <= RECONSTRUCTION_TOLERANCE
    for prompt in SMOL_PROMPTS[1:2]:
        results = lambda_sweep(model, tokenizer, SMOL_CONCEPT, prompt, lams=(1.0, 0.5, 0.0), n_tokens=n_tokens)
        print("\n" + sweep_table(results))
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        reference = model.generate(ids, max_new_tokens=n_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
        assert results[0].normal_ids[: len(reference)] == reference
        assert [r.lam for r in results] == [1.0, 0.5, 0.0]
        assert results[0].steered_ids == results[0].normal_ids  # λ = 1: the untouched model, token for token
        for r in results:
            assert len(r.steered_ids) == n_tokens
            assert all(0 <= i < model.config.vocab_size for i in r.steered_ids)
            assert r.steered_text.startswith(prompt)
