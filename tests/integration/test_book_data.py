"""The sweep rows committed in book/data/ (the "At scale" page) still match a recomputation by today's code.

A row is recomputed with `prompt_row`, the function `lllm sweep` calls, with the layers and components the row was
computed with; its shortest prompt keeps the test short. The stable ranks are now trace/λ_max of one Gram matrix, no
longer Σσ²/σ²_max of an SVD: the same number to float32 rounding, hence the 1e-5 relative tolerance of issue 14.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lllm.analyses.pipeline import prompt_row

DATA = Path(__file__).resolve().parents[2] / "book" / "data"
RTOL = 1e-5
LOGIT_ATOL = 1e-4


def _components(row) -> list[str]:
    return [c for c in ("layer", "attn", "mlp") if row[f"cumulative_stable_rank_{c}"] is not None]


@pytest.mark.parametrize("name, fixture", [("smollm2-135m", "smollm2"), ("gemma3-270m", "gemma3"),
                                           ("qwen2.5-coder-0.5b", "qwen")])
def test_committed_sweep_row_matches_a_recomputation(name, fixture, request):
    rows = pd.read_parquet(DATA / f"sweep-{name}.parquet")
    rows = rows[rows["error"].isna()]
    row = rows.loc[rows["n_tokens"].idxmin()]
    model, tokenizer = request.getfixturevalue(fixture)
    assert model.lllm_source["sha256"] == row["model_sha256"]  # the same weights
    fresh = prompt_row(model, tokenizer, row["prompt"], layers=[int(x) for x in row["layers"]],
                       components=_components(row))
    assert fresh["token_ids"] == list(row["token_ids"])
    assert fresh["next_token_ids"] == list(row["next_token_ids"])
    assert fresh["u_token_ids"] == list(row["u_token_ids"])
    assert fresh["u1_matches_prediction"] == row["u1_matches_prediction"]
    # the model's own float32 forward, not the analysis: its logits round differently on another CPU's GEMM kernels
    # (rows computed on an AMD EPYC, recomputed on an Intel Xeon: Gemma 3's probabilities 1.4e-5 apart, relative),
    # and a probability's relative error is its logit's absolute error, so they are compared as log-probabilities
    # to 1e-4, ~50× the float32 rounding of a logit of size 30 (1.8e-6). A wrong token, softcap or prompt is off
    # by far more.
    np.testing.assert_allclose(np.log(fresh["next_probs"]), np.log(row["next_probs"]), rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(fresh["u_singular_values"], row["u_singular_values"], rtol=RTOL)
    np.testing.assert_allclose(fresh["stable_rank"], row["stable_rank"], rtol=RTOL)
    np.testing.assert_allclose(fresh["token_stable_ranks"], row["token_stable_ranks"], rtol=RTOL)
    for comp in _components(row):
        np.testing.assert_allclose(fresh[f"cumulative_stable_rank_{comp}"], row[f"cumulative_stable_rank_{comp}"],
                                   rtol=RTOL, err_msg=comp)
    assert fresh["reconstruction_error"] < 1e-5 and row["reconstruction_error"] < 1e-5
