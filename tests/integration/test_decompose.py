"""lllm.analyses.decompose on SmolLM2-135M: the decoded output is the model's greedy token."""

from __future__ import annotations

import pytest
import torch

from lllm import detached_jacobian
from lllm.analyses.decompose import decode_output, decode_svd, stable_rank, token_svds

PROMPT = "The bridge out of Marin is the"


@pytest.fixture(scope="module")
def smollm2_result(smollm2):
    model, tokenizer = smollm2
    return model, tokenizer, detached_jacobian(model, tokenizer, PROMPT, progress=False)


def test_smollm2_decoded_output_is_the_greedy_token(smollm2_result):
    model, tokenizer, result = smollm2_result
    with torch.no_grad():
        logits = model(torch.tensor([result.token_ids])).logits[0, -1]
    decoded = decode_output(result.output, model, tokenizer, k=3)
    assert decoded.ids[0] == int(logits.argmax())
    dec = token_svds(result)[-1]
    table = decode_svd(dec, model, tokenizer, k_vectors=3, k_tokens=5)
    print(f"\nSmolLM2 {PROMPT!r} -> {decoded}")
    print(f"J⁺ of the last token {result.tokens[-1]!r}: stable rank {stable_rank(dec):.3f}, "
          f"relative error {result.relative_error:.2e}")
    for row in table:
        print(f"  σ{row['index']} = {row['singular_value']:.4g}  U: {row['u']['tokens']}  V: {row['v']['tokens']}")
