"""The notebooks' helpers in lllm.apps.plots: fast-configuration layers, figure files, and the verdicts of the
"Paper vs. this book" table."""

from __future__ import annotations

import copy
import os
import dataclasses

import matplotlib
import pytest
import torch
from tiny import IdsTokenizer, tiny_model

from lllm.analyses.pipeline import analyze
from lllm.analyses.steering import SteeringResult
from lllm.apps.claims import CLAIMS, at_scale_rates, paper_claims, quote_text
from lllm.apps.plots import analysis_layers, figure_title, save_figure

FALLBACK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"

matplotlib.use("Agg")


def test_analysis_layers():
    assert analysis_layers(30, fast=False) is None
    assert analysis_layers(30, fast=True) == [0, 10, 20, 29]
    assert analysis_layers(18, fast=True) == [0, 10, 17]
    assert analysis_layers(1, fast=True) == [0]


def test_save_figure_writes_png_and_svg(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set_title(figure_title("tiny", "1 2 3", "error 1e-7"))
    paths = save_figure(fig, tmp_path / "out", "line")
    plt.close(fig)
    assert [p.name for p in paths] == ["line.png", "line.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "“1 2 3”" in paths[1].read_text()


def _sweep(steered: bool, unchanged_at_one: bool = True) -> list[SteeringResult]:
    """One prompt's λ sweep (λ = 1, then λ = 0) toward "Golden": whether λ = 0 brings the word in, and whether
    λ = 1 leaves the continuation as it was."""
    normal = "Here is a painting of the sea"

    def result(lam: float, ids: list[int], text: str) -> SteeringResult:
        return SteeringResult("The Golden", "Here is a painting of the", 1, lam, [1, 2], [7], ids, normal, text)

    return [result(1.0, [7] if unchanged_at_one else [8], normal if unchanged_at_one else normal + " wall"),
            result(0.0, [9], "Here is a painting of the Golden" if steered else normal)]


@pytest.fixture(scope="module")
def tiny_analysis():
    """The per-prompt analysis of a bias-free tiny Llama in float32 (relative error of J⁺ ≈ 6e-7, d = 32)."""
    return analyze(tiny_model("llama", torch.float32, seed=0), IdsTokenizer(), "1 2 3 4 5", progress=False)


CLAIM_CASES = [
    # the tiny model's own measurement: a bias-free random model reconstructs y exactly
    ("J⁺ reconstructs y (float32)", {}, {}, "reproduced"),
    ("J⁺ reconstructs y (float32)", {"relative_error": 9e-6}, {}, "reproduced"),  # threshold 1e-5 in float32
    ("J⁺ reconstructs y (float32)", {"relative_error": 2e-5}, {}, "not reproduced"),
    ("J⁺ reconstructs y (float16)", {}, {}, "not measured"),
    ("J⁺ reconstructs y (float16)", {}, {"float16_error": 1.7e-3}, "reproduced"),  # threshold 1e-2
    ("J⁺ reconstructs y (float16)", {}, {"float16_error": 0.03}, "not reproduced"),
    ("J⁺ reconstructs y (float16)", {}, {"float16_error": "failed: overflow"}, "not reproduced"),
    ("the ordinary J does not", {"ordinary_relative_error": 0.2}, {}, "reproduced"),  # > 0.1
    ("the ordinary J does not", {"relative_error": 1e-6, "ordinary_relative_error": 0.05}, {}, "partly"),  # > 1e3·err
    ("the ordinary J does not", {"relative_error": 1e-6, "ordinary_relative_error": 5e-4}, {}, "not reproduced"),
    ("J⁺ᵢ are extremely low rank", {"token_stable_rank": [0.2, 0.3]}, {}, "reproduced"),  # < 1% of d = 32
    ("J⁺ᵢ are extremely low rank", {"token_stable_rank": [1.7, 3.1]}, {}, "partly"),  # < 10% of d
    ("J⁺ᵢ are extremely low rank", {"token_stable_rank": [1.7, 3.3]}, {}, "not reproduced"),
    ("the first token has the largest spectrum", {}, {}, "not measured"),  # no BOS token given
    ("the first token has the largest spectrum", {"token_ids": [7, 2, 3, 4, 5]}, {"bos_token_id": 1},
     "not measured"),  # the prompt does not start with the BOS token
    ("steering with J⁺ of a concept", {}, {}, "not measured"),
    ("steering with J⁺ of a concept", {}, {"steering": [_sweep(True), _sweep(True)]}, "reproduced"),
    ("steering with J⁺ of a concept", {}, {"steering": [_sweep(True), _sweep(False)]}, "partly"),
    ("steering with J⁺ of a concept", {}, {"steering": [_sweep(True), _sweep(True, unchanged_at_one=False)]},
     "partly"),
    ("steering with J⁺ of a concept", {}, {"steering": [_sweep(False), _sweep(False)]}, "not reproduced"),
]


@pytest.mark.parametrize("claim, meta, options, verdict", CLAIM_CASES,
                         ids=[f"{case[0]}: {case[3]} {i}" for i, case in enumerate(CLAIM_CASES)])
def test_paper_claims_verdicts_follow_the_measurements(tiny_analysis, claim, meta, options, verdict):
    """A verdict from measurements on either side of the claim's threshold (none measured: "not measured")."""
    analysis = dataclasses.replace(tiny_analysis, meta={**tiny_analysis.meta, **meta})
    table = paper_claims(analysis, **options).set_index("claim")
    assert table.loc[claim, "verdict"] == verdict, table.loc[claim, "measured"]


def test_the_concept_word_of_the_papers_concept_is_golden():
    from lllm.apps.steering_tables import concept_word

    assert concept_word("The Golden Gate") == "Golden"  # Sec. 3.6: the model predicts "Bridge"
    assert concept_word("a painting of the sea") == "sea"


def test_the_bos_claim_is_measured_on_a_prompt_that_starts_with_bos(tiny_analysis):
    """Starting with the BOS token (id 1 here), the verdict follows where the largest σ₁ is."""
    spectra = tiny_analysis.token_spectra.clone()
    for biggest, verdict in ((0, "reproduced"), (2, "not reproduced")):
        spectra[:, 0] = 1.0
        spectra[biggest, 0] = 10.0
        analysis = dataclasses.replace(tiny_analysis, token_spectra=spectra.clone(),
                                       meta={**tiny_analysis.meta, "token_ids": [1, 2, 3, 4, 5]})
        table = paper_claims(analysis, bos_token_id=1).set_index("claim")
        assert table.loc["the first token has the largest spectrum", "verdict"] == verdict


def _deeper(analysis, ranks, tails, emerged):
    """The tiny analysis as if it had len(ranks) layers: these cumulative stable ranks, spectra whose mean
    σ₂..₁₀/σ₁ is `tails`, and the prediction decoded at the layers in `emerged` only."""
    n, d = len(ranks), analysis.layer_spectra["layer"].shape[1]
    spectra = torch.ones(n, d)
    for i, tail in enumerate(tails):
        spectra[i, 0], spectra[i, 1:10] = 1.0, tail
    predicted = analysis.meta["next_tokens"][0]["id"]
    row = analysis.meta["layer_decodings"][0]
    decodings = [[{**entry, "ids": [predicted if (ell in emerged and j == 0) else -1]} for j, entry in enumerate(row)]
                 for ell in range(n)]
    stable = {"cumulative": {"layer": list(ranks)}, "layerwise": analysis.meta["stable_ranks"]["layerwise"]}
    meta = {**analysis.meta, "layers": list(range(n)), "stable_ranks": stable, "layer_decodings": decodings}
    return dataclasses.replace(analysis, meta=meta, layer_spectra={**analysis.layer_spectra, "layer": spectra})


@pytest.mark.parametrize("ranks, verdict", [
    ([9, 7, 6, 4, 2], "reproduced"),  # ρ = −1
    ([5, 7, 3, 8, 4], "partly"),  # ends lower, but ρ = −0.1: a wander, not a decrease
    ([2, 4, 6, 7, 9], "not reproduced"),
])
def test_dimensionality_decreases_only_with_a_strong_trend(tiny_analysis, ranks, verdict):
    table = paper_claims(_deeper(tiny_analysis, ranks, [0.5] * 5, [])).set_index("claim")
    assert table.loc["dimensionality decreases with depth", "verdict"] == verdict


@pytest.mark.parametrize("tails, verdict", [
    ([0.5, 0.4, 0.3, 0.2, 0.1], "reproduced"),
    ([0.5, 0.6, 0.2, 0.7, 0.4], "partly"),  # first and last alone would say "reproduced"
    ([0.1, 0.2, 0.3, 0.4, 0.5], "not reproduced"),
])
def test_later_layers_lower_rank_reads_every_layer_not_just_the_ends(tiny_analysis, tails, verdict):
    table = paper_claims(_deeper(tiny_analysis, [5] * 5, tails, [])).set_index("claim")
    assert table.loc["later layers are lower rank", "verdict"] == verdict


@pytest.mark.parametrize("emerged, verdict", [
    ([3, 4], "reproduced"),
    ([4], "partly"),  # the last layer's map is lm_head's own: it decodes the prediction anyway
    ([0, 3], "partly"),
    ([], "not reproduced"),
])
def test_intelligible_decodings_need_a_layer_before_the_last(tiny_analysis, emerged, verdict):
    table = paper_claims(_deeper(tiny_analysis, [5] * 5, [0.5] * 5, emerged)).set_index("claim")
    assert table.loc["decodings become intelligible in later layers", "verdict"] == verdict


def test_notebook_setup_resolves_the_prompt_and_shows_whole_tables():
    import pandas as pd

    from lllm.apps import notebook
    from lllm.defaults import DEFAULT_PROMPT

    assert notebook.setup(None) == DEFAULT_PROMPT and notebook.setup("The Golden") == "The Golden"
    wide = pd.DataFrame([range(30)], columns=[f"layer {i}" for i in range(30)])
    assert "..." not in repr(wide) and "…" not in wide.to_html()


def test_notebook_setup_keeps_missing_glyph_warnings_off_the_page():
    """matplotlib warns once per glyph its font lacks, with the path to lllm: a book page must not show that."""
    import warnings

    import matplotlib.pyplot as plt

    from lllm.apps import notebook

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notebook.setup()
        fig, ax = plt.subplots()
        ax.set_title("的 Golden")  # a CJK token, as Qwen's decodings hold
        fig.canvas.draw()
        plt.close(fig)
    assert not [w for w in caught if "missing from font" in str(w.message)]


def test_readable_enlarges_text_that_the_page_would_shrink_below_9_pt():
    import matplotlib.pyplot as plt

    from lllm.apps import notebook

    wide, ax = plt.subplots(figsize=(12, 6), dpi=90)  # shown at 688 of its 1080 px
    ax.plot([1, 2, 3], label="a line")
    ax.set_title("a long title that will have to wrap once its text is larger, because it is longer than its axes "
                 "are wide", fontsize=8)
    ax.legend(fontsize=6)
    assert notebook.smallest_font_px(wide) < notebook.MIN_FONT_PX
    assert notebook.readable(wide) > 1
    assert notebook.smallest_font_px(wide) >= notebook.MIN_FONT_PX - 1e-9
    assert "\n" in ax.get_title()  # wrapped to its axes
    small, ax = plt.subplots(figsize=(5, 3), dpi=90)  # shown at its own size
    ax.plot([1, 2, 3])
    ax.tick_params(labelsize=10)
    assert notebook.readable(small) == 1.0
    plt.close("all")


def test_headline_table_is_built_from_what_the_notebooks_recorded(tmp_path):
    from lllm.apps.book import headline

    assert "did not run" in headline.headline_markdown([tmp_path / "nothing"])
    model = {"float32_error": 6.5e-7, "float64_error": 1.2e-15, "ordinary_error": 0.83, "max_token_stable_rank": 10.4,
             "d": 576, "first_layer": 0, "first_rank": 7.5, "last_layer": 29, "last_rank": 1.4,
             "verdicts": [["reproduced", 9], ["partly", 2], ["not reproduced", 1], ["not measured", 0]]}
    headline.record(tmp_path / "pvb", "models", {"smollm2-135m": model})
    headline.record(tmp_path / "arch", "architectures", {"exact": 27, "checked": 28})
    text = headline.write_headline(tmp_path / "book", [tmp_path / "pvb", tmp_path / "arch"]).read_text()
    assert "| smollm2-135m | 6.5e-07 | 1.2e-15 | 0.83 | 10.40 (of 576) | 7.50 (layer 0) → 1.40 (layer 29) | 9 / 2 / 1 / 0 |" \
        in text
    assert "27 of 28 architectures" in text


def _with_u(analysis, tokens: list[list[str]]):
    """The analysis with the last token's U₁…U₃ decoding to these tokens (top 5 each)."""
    decodings = copy.deepcopy(analysis.meta["token_decodings"])
    for entry, words in zip(decodings[-1], tokens):
        entry["u"]["tokens"] = words
    return dataclasses.replace(analysis, meta={**analysis.meta, "token_decodings": decodings})


@pytest.mark.parametrize("tokens, verdict", [
    ([[" Golden", "x"], [" only", "y"], [" most", "z"]], "reproduced"),
    ([[" only", " bridge"], [" most", "y"], [" one", "z"]], "partly"),  # in a top 5, not a top token
    ([[" only", "x"], [" most", "y"], [" one", "z"]], "not reproduced"),
])
def test_fig5_bridge_words_must_be_decoded(tiny_analysis, tokens, verdict):
    table = paper_claims(_with_u(tiny_analysis, tokens)).set_index("claim")
    assert table.loc["U decodes to bridge words", "verdict"] == verdict


def _projected(analysis, early: float, before_last: float):
    """The tiny analysis as if it had 6 layers whose top vectors project on the last layer's by `early` (first
    third) and `before_last` (layer 4)."""
    d = analysis.layer_top_u["layer"].shape[1]
    top = torch.zeros(6, d, 2)
    top[-1, 0, 0], top[-1, 1, 1] = 1.0, 1.0  # the last layer's u₁, u₂: e₀, e₁
    for ell in range(5):
        value = early if ell < 2 else before_last if ell == 4 else 0.3
        top[ell, 0, 0], top[ell, 2, 0] = value, (1 - value**2) ** 0.5
        top[ell, 1, 1], top[ell, 3, 1] = value, (1 - value**2) ** 0.5
    meta = {**analysis.meta, "layers": list(range(6)),
            "stable_ranks": {"cumulative": {"layer": [5.0] * 6}, "layerwise": {"layer": [1, 2, 3, 4, 5, 9]}}}
    return dataclasses.replace(analysis, meta=meta, layer_top_u={"layer": top},
                               layer_spectra={"layer": torch.ones(6, d)})


@pytest.mark.parametrize("early, before_last, verdict", [
    (0.1, 0.9, "reproduced"), (0.1, 0.3, "partly"), (0.8, 0.9, "not reproduced")])
def test_fig6b_early_vectors_stay_near_the_origin(tiny_analysis, early, before_last, verdict):
    table = paper_claims(_projected(tiny_analysis, early, before_last)).set_index("claim")
    assert table.loc["early layers' vectors differ from the last's", "verdict"] == verdict
    assert table.loc["layer-wise dimensionality peaks near the end", "verdict"] == "reproduced"  # layer 5 of 6


def test_every_claim_links_to_its_page_and_shows_its_at_scale_rate(tiny_analysis):
    table = paper_claims(tiny_analysis, page_slug="tiny", at_scale={"U decodes to the prediction": "3 of 4"})
    assert list(table["claim"]) == [c.name for c in CLAIMS]
    assert table.set_index("claim").loc["J⁺ reconstructs y (float32)", "page"] == "../fig3/tiny.html"
    assert table.set_index("claim").loc["U decodes to the prediction", "at scale"] == "3 of 4"
    assert all("$" not in text and "“" in text for text in table["the paper"])  # readable where math is not typeset
    assert quote_text("on the order of  $10^{-6}$  for *float32* precision") == "on the order of 10⁻⁶ for float32 precision"


def test_at_scale_rates_count_the_prompts_where_a_claim_holds():
    import pandas as pd

    rows = pd.DataFrame({"error": [None, None, "boom"], "reconstruction_error": [1e-6, 3e-5, None],
                         "u1_matches_prediction": [True, False, None], "token_stable_ranks": [[1.0, 2.0], [9.0], None],
                         "cumulative_stable_rank_layer": [[5.0, 3.0, 1.0], [1.0, 2.0, 3.0], None]})
    rates = at_scale_rates(rows, d=100)
    assert rates["J⁺ reconstructs y (float32)"] == "1 of 2 prompts (50%)"
    assert rates["U decodes to the prediction"] == "1 of 2 prompts (50%)"
    assert rates["J⁺ᵢ are extremely low rank"] == "0 of 2 prompts (0%)"  # 2.0 and 9.0 are not below 1% of d
    assert rates["dimensionality decreases with depth"].startswith("1 of 2 prompts")


@pytest.mark.skipif(not os.path.exists(FALLBACK_FONT), reason=f"{FALLBACK_FONT} is not installed (fonts-wqy-microhei)")
def test_cjk_and_hangul_tokens_are_drawn_not_boxed():
    """With the fallback font, matplotlib finds a glyph for each character (it warns for every one it must box)."""
    import warnings

    import matplotlib.pyplot as plt

    from lllm.apps import notebook

    notebook.setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # undo setup's filter: a missing glyph must show here
        warnings.simplefilter("always")
        fig, ax = plt.subplots()
        ax.set_title("的 桥 다리 Golden")
        fig.canvas.draw()
        plt.close(fig)
    assert not [w for w in caught if "missing from font" in str(w.message)]


@pytest.mark.parametrize("families, verdict", [
    ({"Llama 3": True, "Gemma 3": True}, "reproduced"), ({"Llama 3": True, "Gemma 3": False}, "partly"),
    ({"Llama 3": False, "Gemma 3": False, "Qwen 3": True}, "not reproduced"), (None, "not measured")])
def test_the_model_families_row_follows_the_tiny_model_checks(tiny_analysis, families, verdict):
    table = paper_claims(tiny_analysis, families=families).set_index("claim")
    assert table.loc["the paper's model families are exact", "verdict"] == verdict


def test_the_papers_families_are_exact_on_tiny_models():
    from lllm.apps.claims import PAPER_FAMILIES, paper_families

    assert paper_families() == {family: True for family in PAPER_FAMILIES}


def test_the_headline_counts_the_verdicts_of_paper_claims(tiny_analysis, tmp_path):
    from lllm.apps import claims
    from lllm.apps.book import headline

    table = paper_claims(tiny_analysis)
    headline.record(tmp_path, "models", {"tiny": claims.headline(tiny_analysis, table)})
    text = headline.headline_markdown([tmp_path])
    assert "claims: " + " / ".join(claims.VERDICT_COLORS) in text
    counts = " / ".join(str(int((table["verdict"] == v).sum())) for v in claims.VERDICT_COLORS)
    assert text.splitlines()[2].endswith(f"| {counts} |")
