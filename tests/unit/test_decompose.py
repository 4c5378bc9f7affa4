"""Tests of lllm.analyses.decompose: SVD sign convention, stable rank, and token decodings against brute force."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import IdsTokenizer, tiny_model

from lllm import detached_jacobian
from lllm.analyses.decompose import (
    combined_svd, decode_input, decode_output, decode_svd, per_token_stable_rank, projection_onto,
    row_col_features, split_right_vectors, stable_rank, svd, token_svds,
)
import lllm.analyses.decompose as dec
from lllm.errors import LLLMError, UnsupportedModelError
from lllm.kernel.oplevel import detached

TOKENIZER = IdsTokenizer()
DECODE_FAMILIES = ("llama", "gemma3")  # untied lm_head; tied lm_head with a √d-scaled embedding


@pytest.fixture(scope="module", params=DECODE_FAMILIES)
def model64(request):
    """A tiny float64 model: its scores are exact enough that no two tokens tie at random inputs."""
    return tiny_model(request.param, torch.float64, seed=1)


def assert_ties_free(sorted_scores: torch.Tensor) -> None:
    """Precondition of a rank-by-rank comparison: adjacent sorted scores differ beyond rounding."""
    assert (sorted_scores[:, :-1] - sorted_scores[:, 1:]).min() > 1e-10


# ---------------------------------------------------------------------------------------------
# Decoding: top-k equals a brute-force full sort at every rank
# ---------------------------------------------------------------------------------------------


def test_decode_output_matches_full_sort_at_every_rank(model64):
    vocab, d = model64.get_output_embeddings().weight.shape
    vecs = torch.randn(200, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits = vecs @ model64.lm_head.weight.T  # brute force: every logit, fully sorted
    order = torch.sort(logits, dim=1, descending=True)
    assert_ties_free(order.values)
    decoded = decode_output(vecs, model64, TOKENIZER, k=vocab)
    assert [dec.ids for dec in decoded] == order.indices.tolist()
    torch.testing.assert_close(torch.tensor([dec.scores for dec in decoded], dtype=torch.float64), order.values)
    single = decode_output(vecs[7], model64, TOKENIZER, k=5)
    assert single.ids == order.indices[7, :5].tolist()
    assert single.tokens == [TOKENIZER.decode([i]) for i in single.ids]


def test_decode_input_matches_full_sort_at_every_rank(model64):
    embedding = model64.get_input_embeddings()
    vocab, d = embedding.weight.shape
    with torch.no_grad():
        x_all = embedding(torch.arange(vocab)[None])[0]  # what x is, Gemma's √d scale included
    vecs = torch.randn(200, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cosines = torch.nn.functional.cosine_similarity(vecs[:, None, :], x_all[None, :, :], dim=-1)
    order = torch.sort(cosines, dim=1, descending=True)
    assert_ties_free(order.values)
    decoded = decode_input(vecs, model64, TOKENIZER, k=vocab)
    assert [dec.ids for dec in decoded] == order.indices.tolist()
    torch.testing.assert_close(torch.tensor([dec.scores for dec in decoded], dtype=torch.float64), order.values)


def test_input_embedding_decodes_to_itself(model64):
    embedding = model64.get_input_embeddings()
    with torch.no_grad():
        x = embedding(torch.tensor([[5, 17, 40]]))[0]
    decoded = decode_input(x * 3.0, model64, TOKENIZER, k=2)
    assert [dec.ids[0] for dec in decoded] == [5, 17, 40]
    assert [dec.scores[0] for dec in decoded] == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


@pytest.mark.parametrize("decoder", [decode_output, decode_input])
def test_both_signs_decode_minus_vec(model64, decoder):
    vec = torch.randn(model64.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    both = decoder(vec, model64, TOKENIZER, 6, signs="both")
    assert both.ids == decoder(vec, model64, TOKENIZER, 6).ids
    assert both.negative.ids == decoder(-vec, model64, TOKENIZER, 6).ids
    assert both.negative.ids != both.ids
    assert "|" in repr(both)
    json.dumps(both.to_dict())


def test_through_norm_decodes_the_pre_norm_residual_to_the_greedy_token(model64):
    captured = {}
    norm = model64.get_decoder().norm
    handle = norm.register_forward_pre_hook(lambda module, args: captured.update(h=args[0][0, -1].clone()))
    try:
        with torch.no_grad():
            logits = model64(torch.tensor([[3, 9, 27, 81]])).logits[0, -1]
    finally:
        handle.remove()
    assert decode_output(captured["h"], model64, TOKENIZER, k=1, through_norm=True).ids == [int(logits.argmax())]
    without = decode_output(captured["h"], model64, TOKENIZER, k=5)
    with_norm = decode_output(captured["h"], model64, TOKENIZER, k=5, through_norm=True)
    assert without.scores != with_norm.scores  # the norm's (1 + w) or w weights change the logits


def test_through_norm_is_refused_inside_detached(model64):
    with detached(model64), pytest.raises(UnsupportedModelError, match="outside lllm.detached"):
        decode_output(torch.ones(model64.config.hidden_size), model64, TOKENIZER, through_norm=True)


def test_decoding_bad_input_raises(model64):
    d = model64.config.hidden_size
    with pytest.raises(LLLMError, match="signs"):
        decode_output(torch.ones(d), model64, TOKENIZER, signs="negative")
    with pytest.raises(LLLMError, match="vocabulary size"):
        decode_input(torch.ones(d), model64, TOKENIZER, k=10_000)
    with pytest.raises(LLLMError, match="d = "):
        decode_output(torch.ones(d + 1), model64, TOKENIZER)
    with pytest.raises(LLLMError, match="zero vector"):
        decode_input(torch.zeros(d), model64, TOKENIZER)


# ---------------------------------------------------------------------------------------------
# SVD, sign convention, stable rank, projections
# ---------------------------------------------------------------------------------------------


def random_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(12, 12), (8, 20), (20, 8)])
def test_svd_reconstructs_and_is_orthonormal(shape):
    A = random_matrix(*shape, seed=5)
    dec = svd(A)
    r = min(shape)
    assert dec.U.shape == (shape[0], r) and dec.S.shape == (r,) and dec.Vh.shape == (r, shape[1])
    assert dec.V.shape == (shape[1], r) and dec.complete
    torch.testing.assert_close(dec.matrix(), A, rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.U.mT @ dec.U, torch.eye(r, dtype=A.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.Vh @ dec.V, torch.eye(r, dtype=A.dtype), rtol=0, atol=1e-12)
    assert (dec.S[:-1] >= dec.S[1:]).all()


def test_sign_convention_without_reference():
    A = random_matrix(15, 10, seed=6)
    dec = svd(A)
    biggest = dec.U.abs().argmax(dim=0)
    assert (dec.U[biggest, torch.arange(dec.k)] > 0).all()
    again = svd(A.clone())
    assert torch.equal(again.U, dec.U) and torch.equal(again.Vh, dec.Vh) and torch.equal(again.S, dec.S)
    # -A = U S (-Vh): the convention fixes U, so the flip must land on V
    flipped = svd(-A)
    torch.testing.assert_close(flipped.U, dec.U, rtol=0, atol=1e-12)
    torch.testing.assert_close(flipped.Vh, -dec.Vh, rtol=0, atol=1e-12)


def test_sign_convention_with_reference():
    A = random_matrix(15, 10, seed=7)
    reference = random_matrix(1, 15, seed=8)[0]
    dec = svd(A, reference=reference)
    assert (reference @ dec.U > 0).all()
    opposite = svd(A, reference=-reference)
    torch.testing.assert_close(opposite.U, -dec.U, rtol=0, atol=1e-12)
    torch.testing.assert_close(opposite.matrix(), A, rtol=0, atol=1e-12)


def test_top_k_is_the_leading_part_of_the_full_svd():
    A = random_matrix(30, 18, seed=9)
    full, top = svd(A), svd(A, 4)
    assert top.k == 4 and not top.complete
    torch.testing.assert_close(top.S, full.S[:4], rtol=0, atol=0)
    torch.testing.assert_close(top.U, full.U[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(top.Vh, full.Vh[:4], rtol=0, atol=0)


def test_svd_bad_input_raises():
    with pytest.raises(LLLMError, match="2-D"):
        svd(torch.ones(3, 3, 3))
    with pytest.raises(LLLMError, match="k must be"):
        svd(torch.ones(3, 4), 4)
    with pytest.raises(LLLMError, match="reference"):
        svd(torch.ones(3, 4), reference=torch.ones(4))
    with pytest.raises(LLLMError, match="NaN"):
        svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_stable_rank_of_rank_one_and_identity():
    a, b = random_matrix(1, 9, seed=10)[0], random_matrix(1, 6, seed=11)[0]
    assert stable_rank(torch.outer(a, b)) == pytest.approx(1.0, abs=1e-12)
    assert stable_rank(torch.eye(7, dtype=torch.float64)) == pytest.approx(7.0, abs=1e-12)
    assert stable_rank(torch.tensor([3.0, 4.0])) == pytest.approx(25 / 16)  # S_max = 4, in any order
    A = random_matrix(9, 6, seed=12)
    assert stable_rank(svd(A)) == pytest.approx(stable_rank(A), abs=1e-12)
    frobenius, spectral = torch.linalg.matrix_norm(A), torch.linalg.matrix_norm(A, 2)
    assert stable_rank(A) == pytest.approx(float(frobenius**2 / spectral**2))
    with pytest.raises(LLLMError, match="every singular value"):
        stable_rank(svd(A, 2))
    with pytest.raises(LLLMError, match="zero matrix"):
        stable_rank(torch.zeros(3, 3))


def test_projection_onto_itself_is_identity():
    A = random_matrix(20, 12, seed=13)
    reference = random_matrix(1, 20, seed=14)[0]
    dec = svd(A, reference=reference)
    torch.testing.assert_close(projection_onto(dec, svd(A, reference=reference), k=3), torch.eye(3, dtype=A.dtype),
                               rtol=0, atol=1e-12)
    # a flipped reference flips every pair: the projection becomes -identity
    torch.testing.assert_close(projection_onto(dec, svd(A, reference=-reference), k=2), -torch.eye(2, dtype=A.dtype),
                               rtol=0, atol=1e-12)
    other = projection_onto(dec, svd(random_matrix(20, 12, seed=15)), k=2)
    assert other.shape == (2, 2) and (other.abs() <= 1 + 1e-12).all() and (other.abs() < 0.99).all()
    with pytest.raises(LLLMError, match="different spaces"):
        projection_onto(dec, svd(random_matrix(10, 12, seed=16)))


# ---------------------------------------------------------------------------------------------
# Jacobian results of a tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_result():
    model = tiny_model("llama", torch.float64, seed=2)
    return model, detached_jacobian(model, TOKENIZER, "1 5 9 13 17", progress=False)


def test_token_svds_and_stable_ranks(tiny_result):
    model, result = tiny_result
    svds = token_svds(result)
    ranks = per_token_stable_rank(result)
    assert len(svds) == len(result.token_ids) == ranks.shape[0]
    for i, dec in enumerate(svds):
        torch.testing.assert_close(dec.matrix(), result.block(i), rtol=0, atol=1e-12)
        assert (result.output @ dec.U > 0).all()
        assert ranks[i].item() == pytest.approx(stable_rank(result.block(i)), rel=1e-12)
    top = token_svds(result, k=3)
    torch.testing.assert_close(top[-1].S, svds[-1].S[:3], rtol=1e-12, atol=0)


def test_combined_svd_splits_per_token(tiny_result):
    model, result = tiny_result
    dec = combined_svd(result)
    T, d = result.inputs.shape
    torch.testing.assert_close(dec.matrix(), result.combined, rtol=0, atol=1e-12)
    pieces = split_right_vectors(dec, T)
    assert pieces.shape == (dec.k, T, d)
    # y = [J⁺₀ … J⁺_T] vec(x): the split pieces pair with each token's x
    coefficients = torch.einsum("ktd,td->k", pieces, result.inputs)
    torch.testing.assert_close(dec.U @ (dec.S * coefficients) + (result.bias if result.bias is not None else 0),
                               result.output, rtol=0, atol=1e-10)


def test_decode_svd_is_json_and_matches_direct_decoding(tiny_result):
    model, result = tiny_result
    dec = token_svds(result)[-1]
    table = decode_svd(dec, model, TOKENIZER, k_vectors=3, k_tokens=4, signs="both")
    assert json.loads(json.dumps(table)) == table
    assert [row["index"] for row in table] == [0, 1, 2]
    for i, row in enumerate(table):
        assert row["singular_value"] == pytest.approx(float(dec.S[i]))
        assert row["u"]["ids"] == decode_output(dec.U[:, i], model, TOKENIZER, 4).ids
        assert row["v"]["ids"] == decode_input(dec.Vh[i], model, TOKENIZER, 4).ids
        assert row["v"]["negative"]["ids"] == decode_input(-dec.Vh[i], model, TOKENIZER, 4).ids
    combined = decode_svd(combined_svd(result), model, TOKENIZER, k_vectors=2, k_tokens=3)
    pieces = split_right_vectors(combined_svd(result), len(result.token_ids))
    assert len(combined[0]["v_by_token"]) == len(result.token_ids)
    assert combined[1]["v_by_token"][2]["ids"] == decode_input(pieces[1, 2], model, TOKENIZER, 3).ids


def test_row_col_features_decode_rows_as_inputs_and_columns_as_outputs(tiny_result):
    model = tiny_result[0]
    d = model.config.hidden_size
    generator = torch.Generator().manual_seed(17)
    token = 42
    with torch.no_grad():
        x_token = model.get_input_embeddings()(torch.tensor([[token]]))[0, 0]  # (d,)
    a = torch.rand(d, dtype=torch.float64, generator=generator) + 0.1  # positive: every row is +x_token
    block = torch.outer(a, x_token)  # rows ∝ an input embedding, columns ∝ a
    features = row_col_features(block, model, TOKENIZER, n_features=5, k_tokens=2)
    torch.testing.assert_close(features.row_norms, block.norm(dim=1))
    torch.testing.assert_close(features.col_norms, block.norm(dim=0))
    assert features.rows == torch.argsort(block.norm(dim=1), descending=True)[:5].tolist()
    assert all(dec.ids[0] == token and dec.scores[0] == pytest.approx(1.0) for dec in features.row_tokens)
    logits_a = model.lm_head(a)
    for c, dec in zip(features.cols, features.col_tokens):
        expected = logits_a.argmax() if x_token[c] > 0 else logits_a.argmin()
        assert dec.ids[0] == int(expected)


def test_decode_svd_bad_input_raises(tiny_result):
    model, result = tiny_result
    with pytest.raises(LLLMError, match="k_vectors"):
        decode_svd(token_svds(result, k=2)[0], model, TOKENIZER, k_vectors=3)
    with pytest.raises(LLLMError, match="input embeddings"):
        decode_svd(svd(random_matrix(32, 20, seed=18)), model, TOKENIZER)
    with pytest.raises(LLLMError, match="one Jacobian block"):
        row_col_features(result.jacobian, model, TOKENIZER)


def test_left_spectrum_matches_the_full_svd_of_a_wide_matrix():
    gen = torch.Generator().manual_seed(3)
    matrix = torch.randn(24, 200, dtype=torch.float64, generator=gen) * torch.logspace(0, -3, 24, dtype=torch.float64)[:, None]
    reference = torch.randn(24, dtype=torch.float64, generator=gen)
    S, U = dec.left_spectrum(matrix, 4, reference=reference)
    full = dec.svd(matrix, reference=reference)
    torch.testing.assert_close(S, full.S, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(U, full.U[:, :4], rtol=0, atol=1e-9)
    assert abs(dec.stable_rank(S) - dec.stable_rank(full)) < 1e-9


def test_singular_values_wide_match_the_full_svd():
    matrix = torch.randn(16, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(dec.singular_values_wide(matrix), torch.linalg.svdvals(matrix), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_spectra_refuse_a_matrix_with_nan_or_inf(bad):
    matrix = torch.randn(6, 40, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    matrix[4, 17] = bad
    for call in (dec.singular_values_wide, lambda m: dec.left_spectrum(m, 2), lambda m: dec.stable_ranks_wide(m[None])):
        with pytest.raises(LLLMError, match="NaN or inf"):
            call(matrix)


def test_stable_ranks_refuse_a_float32_gram_that_overflows():
    matrix = torch.randn(6, 40, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    matrix[2, 3] = 1e30  # finite, but its square is not a float32
    with pytest.raises(LLLMError, match="overflow torch.float32"):
        dec.stable_ranks_wide(matrix[None])
    assert dec.singular_values_wide(matrix)[0] > 0  # the float64 Gram holds it
