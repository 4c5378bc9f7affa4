"""Greedy generation with per-step detached Jacobians (paper Fig. 2) on SmolLM2-135M."""

from __future__ import annotations

import torch

from lllm.analyses.generation import generate_with_jacobians

RECONSTRUCTION_TOLERANCE = 1e-5  # float32


def test_smollm2_from_bos(smollm2):
    """Fig. 2 on SmolLM2: three tokens from <|im_start|> alone, each with its J⁺ and spectra."""
    model, tokenizer = smollm2
    result = generate_with_jacobians(model, tokenizer, n_tokens=3, k=4, progress=False)
    print(f"\nSmolLM2 from BOS: {result.text!r}, tokens {result.tokens}, probabilities "
          f"{[round(p, 4) for p in result.probabilities]}, errors {[s.jacobian.relative_error for s in result.steps]}")
    for step in result.steps:
        print("top singular values per input token:", step.spectrum.tolist())
    bos = torch.tensor([[tokenizer.bos_token_id]])
    reference = model.generate(bos, max_new_tokens=3, do_sample=False)[0, 1:].tolist()
    assert result.prompt_ids == [tokenizer.bos_token_id]
    assert result.token_ids[: len(reference)] == reference
    for step in result.steps:
        assert step.jacobian.relative_error <= RECONSTRUCTION_TOLERANCE
        assert step.spectrum.shape == (len(step.input_ids), 4)
