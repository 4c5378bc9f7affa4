"""Matrix-free top-k SVD of J⁺ on SmolLM2-135M, a 64-token prompt, against the full SVD."""

import torch

import lllm
from lllm.kernel.matfree import DetachedOperator, topk_svd


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / |b|, elementwise."""
    return float(((a - b) / b).abs().max())


# the first 64 of this text's 96 SmolLM2 tokens: a prompt long enough that J⁺ has 64 blocks.
LONG_PROMPT = (
    "The Golden Gate Bridge spans the strait between San Francisco Bay and the Pacific Ocean. "
    "When it opened in 1937 it was the longest suspension bridge in the world, and its towers, painted "
    "in a colour called international orange, rise more than two hundred metres above the water. Fog often "
    "rolls in from the ocean in the afternoon and hides the roadway, so that only the tops of the towers "
    "can be seen from the city. The bridge out of Marin is the"
)


def test_smollm2_64_tokens_top8_match_the_full_svd(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(LONG_PROMPT)["input_ids"][:64]
    full = lllm.detached_jacobian(model, tokenizer, ids, progress=False)
    s_full = torch.linalg.svdvals(full.combined.double())[:8]
    with DetachedOperator.from_prompt(model, tokenizer, ids) as op:
        assert op.relative_error <= 1e-5
        u, s, v = topk_svd(op, 8, block_size=4, power_iters=8)
        assert op.counts.vjp == op.counts.jvp == 36  # 72 products, against 576 for the full J
    assert relative(s.double(), s_full) <= 1e-4
