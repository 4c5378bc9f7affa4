"""Matrix-free products and top-k SVDs of J⁺, pinned against the full reverse-mode Jacobian."""

import pytest
import torch

import lllm
from lllm.analyses.decompose import svd
from lllm.errors import LinearizationError, MemoryBudgetError, PromptError
from lllm.kernel.matfree import DetachedOperator, OperatorError, all_token_topk, topk_svd
from tiny import FAMILY_CONFIGS, IdsTokenizer, tiny_model

FAMILIES = sorted(FAMILY_CONFIGS)
PROMPT = "5 17 33 8 90 41 3 3 7"  # 9 tokens
TOK = IdsTokenizer()
WIDE = dict(hidden_size=64, intermediate_size=128)  # d_out = 64, so a 56-column basis is not the whole row space


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / |b|, elementwise."""
    return float(((a - b) / b).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_products_equal_the_full_reverse_jacobian(family):
    model = tiny_model(family, torch.float64)
    full = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    d, T = model.config.hidden_size, 9
    with DetachedOperator.from_prompt(model, TOK, PROMPT, chunk_size=40) as op:
        assert op.shape == (d, T * d) and op.dtype == torch.float64
        basis = torch.eye(T * d, dtype=torch.float64).view(T * d, T, d)
        forward = op.matvec(basis).T.reshape(d, T, d)  # column (i, k) of J⁺ is J⁺ e_(i,k)
        reverse = op.rmatvec(torch.eye(d, dtype=torch.float64))  # row r of J⁺ is J⁺ᵀ e_r
        assert op.counts.jvp == T * d and op.counts.vjp == d
        torch.testing.assert_close(forward, full.jacobian, rtol=0, atol=1e-10)
        torch.testing.assert_close(reverse, full.jacobian, rtol=0, atol=1e-10)
        torch.testing.assert_close(op.output, full.output, rtol=0, atol=1e-12)
        assert op.relative_error <= 1e-12
        assert (op.bias is None) == (family != "qwen2")  # only qwen2 has biases (on q, k and v)
        if op.bias is not None:  # y = J⁺x + c, with c far from negligible
            assert op.bias.abs().max() > 0.1
            torch.testing.assert_close(op.matvec(op.inputs[None])[0] + op.bias, op.output, rtol=0, atol=1e-12)


def test_float32_products_and_reconstruction():
    model = tiny_model("qwen2", torch.float32)
    full = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    with DetachedOperator.from_prompt(model, TOK, PROMPT) as op:
        assert op.relative_error <= 1e-5
        u = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(op.rmatvec(u), torch.einsum("bo,otd->btd", u, full.jacobian), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_topk_svd_matches_the_full_svd(family):
    model = tiny_model(family, torch.float64, **WIDE)
    full = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    with DetachedOperator.from_prompt(model, TOK, PROMPT) as op:
        u, s, v = topk_svd(op, 4, oversample=4, power_iters=6)
        # 8 columns × 7 iterations: a 56-dimensional subspace of the 64-dimensional row space
        assert op.counts.vjp == 56 and op.counts.jvp == 56
        s_full = torch.linalg.svdvals(full.combined)[:4]
        assert relative(s, s_full) <= 1e-8
        assert u.shape == (64, 4) and v.shape == (4, 9, 64)
        # the triplets are singular triplets of J⁺, oriented as lllm.analyses.decompose.svd orients them
        torch.testing.assert_close(full.combined @ v.reshape(4, -1).T, u * s, rtol=0, atol=1e-7)
        torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
        assert (full.output @ u > 0).all()
        exact = svd(full.combined, 4, reference=full.output)  # same vectors, same signs: cosines ≈ +1
        assert (torch.einsum("ok,ok->k", u, exact.U) > 1 - 1e-6).all()
        assert (torch.einsum("kn,kn->k", v.reshape(4, -1), exact.Vh) > 1 - 1e-6).all()
        # a block narrower than k with more iterations (block Krylov): 28 columns, same accuracy
        op.counts.vjp = op.counts.jvp = 0
        _, s_narrow, _ = topk_svd(op, 4, block_size=2, power_iters=13)
        assert op.counts.vjp == 28 and op.counts.jvp == 28
        assert relative(s_narrow, s_full) <= 1e-8

        for token in (0, 4, -1):
            u, s, v = topk_svd(op, 4, oversample=4, power_iters=6, token=token)
            block = full.block(token)
            assert v.shape == (4, 64)
            assert relative(s, torch.linalg.svdvals(block)[:4]) <= 1e-8
            torch.testing.assert_close(block @ v.T, u * s, rtol=0, atol=1e-7)


def test_topk_svd_is_deterministic_and_seeded():
    model = tiny_model("llama", torch.float64, **WIDE)
    with DetachedOperator.from_prompt(model, TOK, PROMPT) as op:
        first, again = topk_svd(op, 3, power_iters=1, seed=7), topk_svd(op, 3, power_iters=1, seed=7)
        other = topk_svd(op, 3, power_iters=1, seed=8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[1], other[1])  # another sketch, another (close) approximation
    assert relative(other[1], first[1]) < 1e-2


def test_a_basis_that_fills_the_row_space_is_exact():
    model = tiny_model("olmo2", torch.float64)  # d_out = 32
    full = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    with DetachedOperator.from_prompt(model, TOK, PROMPT) as op:
        u, s, v = topk_svd(op, 32, oversample=8, power_iters=3)
        assert op.counts.vjp == 32 and op.counts.jvp == 32  # stops once the basis has d_out columns
    assert relative(s, torch.linalg.svdvals(full.combined)) <= 1e-10


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_all_token_topk_strategies_agree_with_per_block_svds(family):
    model = tiny_model(family, torch.float64)
    full = lllm.detached_jacobian(model, TOK, PROMPT, progress=False)
    per_block = torch.linalg.svdvals(full.jacobian.permute(1, 0, 2))[:, :3]  # (T, 3)
    block_bytes = 32 * 32 * 8
    with DetachedOperator.from_prompt(model, TOK, PROMPT) as op:
        auto = all_token_topk(op, 3, progress=False)
        assert auto.strategy == "exact" and auto.products.vjp == 32 and auto.products.jvp == 0
        two_per_pass = all_token_topk(op, 3, memory_budget=2 * block_bytes, progress=False)
        assert two_per_pass.strategy == "exact" and two_per_pass.products.vjp == 32 * 5  # ⌈9/2⌉ passes
        # less than one block fits: only the randomized strategy is possible
        sketched = all_token_topk(op, 3, memory_budget=block_bytes - 1, oversample=29, power_iters=0, progress=False)
        assert sketched.strategy == "randomized"
        with pytest.raises(MemoryBudgetError):
            all_token_topk(op, 3, strategy="exact", memory_budget=block_bytes - 1, progress=False)
    for result in (auto, two_per_pass, sketched):
        assert result.S.shape == (9, 3) and result.U.shape == (9, 32, 3) and result.V.shape == (9, 3, 32)
        torch.testing.assert_close(result.S, per_block, rtol=1e-10, atol=1e-12)
        assert (torch.einsum("o,tok->tk", full.output, result.U) > 0).all()
    torch.testing.assert_close(sketched.U, auto.U, rtol=0, atol=1e-8)  # same orientation convention
    torch.testing.assert_close(two_per_pass.V, auto.V, rtol=0, atol=1e-12)


def test_model_is_restored_and_operator_refuses_misuse():
    model = tiny_model("gemma3", torch.float64)
    ids = torch.tensor([[5, 17, 33, 8]])
    with torch.no_grad():
        before = model(ids).logits
    op = DetachedOperator.from_prompt(model, TOK, "5 17 33 8")
    with pytest.raises(OperatorError, match="closed"):
        op.matvec(torch.zeros(1, 4, 32))
    with op:
        with pytest.raises(OperatorError, match=r"\(B, 4, 32\)"):
            op.matvec(torch.zeros(2, 3, 32))
        with pytest.raises(OperatorError, match=r"\(B, 32\)"):
            op.rmatvec(torch.zeros(2, 31))
        with pytest.raises(OperatorError, match="k must be"):
            topk_svd(op, 33)
        with pytest.raises(OperatorError, match="token 4"):
            topk_svd(op, 2, token=4)
        with pytest.raises(OperatorError, match="cannot hold k=8"):
            topk_svd(op, 8, block_size=2, power_iters=2)
        with pytest.raises(OperatorError, match="strategy"):
            all_token_topk(op, 2, strategy="lanczos")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(OperatorError, match="float32"):
        DetachedOperator(model, torch.zeros(4, 32, dtype=torch.float32))
    with pytest.raises(PromptError, match="position 4"):
        DetachedOperator.from_prompt(model, TOK, "5 17 33 8", position=4)


def test_a_missed_nonlinearity_is_refused(monkeypatch):
    """With a wrong activation factor (g = 1, live in the "gate" split: the tags still prove linearity), J no
    longer reconstructs y: the operator's numeric self-check must refuse to open."""
    from lllm.kernel import rules

    monkeypatch.setattr(rules, "activation_factor", lambda name, h, value, kwargs: torch.ones_like(h))
    model = tiny_model("llama", torch.float64)
    with pytest.raises(LinearizationError):
        with DetachedOperator.from_prompt(model, TOK, PROMPT, mlp_split="gate"):
            pass
    assert not getattr(model, "_lllm_detached", False)
