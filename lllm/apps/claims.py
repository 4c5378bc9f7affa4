"""Paper vs. this book: each claim of the paper in its own words, measured on one model against a stated threshold.

CLAIMS lists the claims in the paper's order, each with its verbatim quote (tests check every quote against the
paper's text) and the book page that shows the measurement. `paper_claims` measures them on one model's analysis;
a verdict follows from the measurement and the threshold alone, and a claim that cannot be measured here (no BOS
token, no steering run) is "not measured", never passed. `at_scale_rates` gives, for the claims the `lllm sweep`
data bears on, the rate over the prompt set, shown beside the single-prompt verdict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lllm.analyses.pipeline import PromptAnalysis
from lllm.apps.steering_tables import concept_appears
from lllm.io.codecs import dtype_name

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_MEASURED = "reproduced", "partly", "not reproduced", "not measured"
VERDICT_COLORS = {REPRODUCED: "#c8ecc8", PARTLY: "#fff0b3", NOT_REPRODUCED: "#f7c6c6", NOT_MEASURED: "#e4e4e4"}

# A trend with depth counts as the paper's when the rank correlation with the layer is at least this strong: a
# model whose values merely end lower than they start, or wander (ρ = −0.14), shows it only partly.
STRONG_TREND = -0.5
FLOAT32_ORDER, FLOAT16_ORDER = 1e-5, 1e-2  # "on the order of 10⁻⁶ / 10⁻³": within one order above still reads so
# Fig. 5's left singular vectors "decode to tokens related to bridges and local geography, particularly the Golden
# Gate Bridge": the words of the paper's own Fig. 5 and Tables 1–3 for that prompt.
BRIDGE_WORDS = ("bridge", "bridges", "golden", "gate", "san", "francisco", "marin", "sausalito", "highway", "bay")


@dataclass(frozen=True)
class Claim:
    """One claim: its short name, the paper's words (verbatim, LaTeX as in the paper's text), where, its page."""

    name: str
    quote: str
    where: str
    chapter: str  # the book chapter whose page shows the measurement (generated/<chapter>/<model>.html)


# The families the paper names (abstract), as the transformers architectures of lllm.apps.zoo: Phi 4 is a
# Phi3ForCausalLM, Ministral a MistralForCausalLM.
PAPER_FAMILIES = {"Llama 3": "llama", "Gemma 3": "gemma3", "Qwen 3": "qwen3", "Phi 4": "phi3",
                  "Mistral Ministral": "mistral", "OLMo 2": "olmo2"}

CLAIMS = (
    Claim("the paper's model families are exact", "We demonstrate this approach across models (Llama 3, Gemma 3, "
          "Qwen 3, Phi 4, Mistral Ministral and OLMo 2, up to Llama 3.3 70B Q4)", "Abstract", "architectures"),
    Claim("J⁺ reconstructs y (float32)", "on the order of  $10^{-6}$  for *float32* precision", "Fig. 3", "fig3"),
    Claim("J⁺ reconstructs y (float16)", "and  $10^{-3}$  for *float16* precision", "Fig. 3", "fig3"),
    Claim("the ordinary J does not", "The same comparison with the original Jacobian does not fall on the identity "
          "line.", "Sec. 3.1", "fig3"),
    Claim("J⁺ᵢ are extremely low rank", "The singular value spectrum is extremely low rank", "Fig. 4", "fig4"),
    Claim("U decodes to the prediction", "decoding the  $U$  singular vectors returns candidate output tokens",
          "Fig. 4", "fig4"),
    Claim("V decodes to input tokens", "Decoding the  $V$  singular vectors returns variants of the input tokens",
          "Fig. 4", "fig4"),
    Claim("U decodes to bridge words", "The left singular vectors decode to tokens related to bridges and local "
          "geography, particularly the Golden Gate Bridge", "Fig. 5", "fig5"),
    Claim("the first token has the largest spectrum", "The first or “beginning of sequence” token has the highest "
          "magnitude in each spectrum", "Sec. 3.4", "fig4"),
    Claim("decodings become intelligible in later layers", "The emergence of intelligible tokens in later layers is "
          "shown in the tables as something like a phase change in the representation.", "Sec. 3.5", "tables1_3"),
    Claim("later layers are lower rank", "Note that later layers are lower rank than earlier layers.", "Fig. 6",
          "fig6"),
    Claim("early layers' vectors differ from the last's", "The singular vectors of the first 10 layers are very "
          "different than those of the last layer, so the projections remain close to the origin.", "Fig. 6", "fig6"),
    Claim("dimensionality decreases with depth", "The dimensionality decreases deeper into the network at each of "
          "these points", "Fig. 6", "fig6"),
    Claim("layer-wise dimensionality peaks near the end", "we also see a large peak in dimensionality near the end.",
          "Sec. 3.5", "fig6"),
    Claim("steering with J⁺ of a concept", "Table 4 shows how the detached Jacobian from an intermediate layer "
          "imposes the Golden Gate Bridge as the semantic output", "Sec. 3.6", "table4"),
)


def quote_text(quote: str) -> str:
    """A quote as a reader sees it on a page that does not typeset math: $10^{-6}$ → 10⁻⁶, $U$ → U, *x* → x."""
    superscript = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
    text = re.sub(r"\$\s*10\^\{([-\d]+)\}\s*\$", lambda m: "10" + m.group(1).translate(superscript), quote)
    text = re.sub(r"\$\s*([A-Za-z])\s*\$", r"\1", text)
    return " ".join(re.sub(r"\*([^*]+)\*", r"\1", text).split())


def _verdict(ok: bool | None, partly: bool = False) -> str:
    if ok is None:
        return NOT_MEASURED
    return REPRODUCED if ok else PARTLY if partly else NOT_REPRODUCED


def _is_decreasing(values: Sequence[float]) -> tuple[float, bool]:
    """Spearman ρ between position and values, and whether ρ ≤ STRONG_TREND (at least 3 values)."""
    from scipy.stats import spearmanr

    if len(values) < 3 or len(set(values)) == 1:
        return math.nan, False
    rho = float(spearmanr(np.arange(len(values)), values).statistic)
    return rho, rho <= STRONG_TREND


def paper_claims(
    analysis: PromptAnalysis,
    *,
    float16_error: float | str | None = None,
    steering: Sequence[Sequence] | None = None,
    concept_word: str = "Golden",
    bos_token_id: int | None = None,
    page_slug: str | None = None,
    at_scale: Mapping[str, str] | None = None,
    families: Mapping[str, bool] | None = None,
    n_layers: int | None = None,
) -> pd.DataFrame:
    """One row per claim of CLAIMS: the paper's words, our threshold, our measurement, the verdict.

    analysis: the model's PromptAnalysis in the working dtype (float32 expected for the float32 claim).
    float16_error: the float16 J⁺'s reconstruction error, or why it could not be computed (str), or None.
    steering: per steered prompt, its λ sweep (SteeringResults), or None when not run.
    bos_token_id: the tokenizer's BOS token; the BOS claim is measured only on a prompt that starts with it.
    page_slug: the model's page name (generated/<chapter>/<slug>.html), for the link to the measurement's page.
    at_scale: claim name -> its rate over the sweep's prompt set (`at_scale_rates`), shown beside the verdict.
    families: the paper's family -> whether its tiny random model is exact (`paper_families`); None: not checked.
    n_layers: the model's number of layers (default: the last analysed layer + 1).
    """
    meta, layers = analysis.meta, analysis.layers
    dtype = dtype_name(analysis.final.jacobian.dtype)
    d = analysis.final.jacobian.shape[0]
    predicted = meta["next_tokens"][0]["id"]
    measured: dict[str, tuple[str, str, str]] = {}  # name -> (threshold, measurement, verdict)

    if not families:
        measured["the paper's model families are exact"] = ("every family exact on a tiny random model", "—",
                                                            NOT_MEASURED)
    else:
        exact = [name for name, ok in families.items() if ok]
        measured["the paper's model families are exact"] = (
            "J⁺ exact in float32 and float64 on a tiny random model of each family's transformers class (partly: "
            "at least half)", f"{len(exact)} of {len(families)} exact" + (
                "" if len(exact) == len(families) else f"; not: {', '.join(n for n in families if n not in exact)}"),
            _verdict(len(exact) == len(families), partly=2 * len(exact) >= len(families)))
    err = meta["relative_error"]
    measured["J⁺ reconstructs y (float32)"] = (
        f"error < {FLOAT32_ORDER:g} in float32 (above the self-check's limit the analysis stops with an error)",
        f"{err:.2e} ({dtype})", _verdict(err < FLOAT32_ORDER) if dtype == "float32" else NOT_MEASURED)
    if isinstance(float16_error, str):
        measured["J⁺ reconstructs y (float16)"] = (f"error < {FLOAT16_ORDER:g} in float16", float16_error,
                                                   NOT_REPRODUCED)
    else:
        measured["J⁺ reconstructs y (float16)"] = (
            f"error < {FLOAT16_ORDER:g} in float16", "—" if float16_error is None else f"{float16_error:.2e}",
            _verdict(None if float16_error is None else bool(float16_error < FLOAT16_ORDER)))
    ordinary = meta["ordinary_relative_error"]
    measured["the ordinary J does not"] = (
        "ordinary error > 0.1, visibly off the line (partly: > 1000 × the J⁺ error)", f"{ordinary:.3g}",
        _verdict(ordinary > 0.1, partly=ordinary > 1e3 * err))

    token_ranks = meta["token_stable_rank"]
    worst = max(token_ranks)
    measured["J⁺ᵢ are extremely low rank"] = (
        f"every stable rank of J⁺ᵢ < 1% of d = {d} (partly: < 10%)",
        f"max stable rank {worst:.2f} over {len(token_ranks)} tokens", _verdict(worst < 0.01 * d,
                                                                                partly=worst < 0.1 * d))
    last = meta["token_decodings"][-1]
    u_top = [i for e in last for i in e["u"]["ids"]]
    measured["U decodes to the prediction"] = (
        "U₁'s top token = greedy prediction (partly: in the top 5 of U₁…U₃)",
        f"prediction {meta['next_tokens'][0]['token']!r}, U₁ → {last[0]['u']['tokens'][0]!r}",
        _verdict(last[0]["u"]["ids"][0] == predicted, partly=predicted in u_top))
    input_ids = set(meta["token_ids"])
    v_hits = [any(i in input_ids for i in entries[0]["v"]["ids"]) for entries in meta["token_decodings"]]
    measured["V decodes to input tokens"] = (
        "V₁ of every J⁺ᵢ has an input token among its top 5 (partly: at least half)",
        f"{sum(v_hits)} of {len(v_hits)} tokens", _verdict(all(v_hits), partly=2 * sum(v_hits) >= len(v_hits)))
    words = lambda tokens: [t.strip().lower() for t in tokens]  # noqa: E731
    top_words = words(e["u"]["tokens"][0] for e in last)
    all_words = words(t for e in last for t in e["u"]["tokens"])
    found = sorted({w for w in all_words if w in BRIDGE_WORDS})
    measured["U decodes to bridge words"] = (
        f"the top token of U₁, U₂ or U₃ of the last J⁺ᵢ is one of {', '.join(BRIDGE_WORDS)} (partly: among their "
        "top 5 tokens)", f"found: {', '.join(found) if found else 'none'}",
        _verdict(any(w in BRIDGE_WORDS for w in top_words), partly=bool(found)))

    first = float(analysis.token_spectra[0, 0])
    biggest = int(analysis.token_spectra[:, 0].argmax())
    starts_with_bos = bos_token_id is not None and meta["token_ids"][0] == bos_token_id
    measured["the first token has the largest spectrum"] = (
        "argmaxᵢ σ₁(J⁺ᵢ) = 0, on a prompt that starts with the BOS token",
        f"largest σ₁ at token {biggest} {meta['tokens'][biggest]!r} ({float(analysis.token_spectra[biggest, 0]):.3g};"
        f" token 0: {first:.3g})" if starts_with_bos else "— (the prompt has no BOS token)",
        _verdict(biggest == 0) if starts_with_bos else NOT_MEASURED)

    decodes = [any(e["ids"][0] == predicted for e in entries) for entries in meta["layer_decodings"]]
    emerged = [ell for ell, hit in zip(layers, decodes) if hit]
    half = layers[len(layers) // 2]
    before_last = [ell for ell in emerged if ell != layers[-1]]  # the last layer's map is lm_head's own: not evidence
    measured["decodings become intelligible in later layers"] = (
        f"the prediction is the top token of a top-3 vector in some layer from {half} on, before the last, and not in "
        f"layer {layers[0]} (partly: in the last layer only, or also early)", f"layers where it appears: "
        f"{emerged or 'none'}", _verdict(bool(before_last) and min(emerged) >= half and not decodes[0],
                                         partly=bool(emerged)))

    many = len(layers) >= 3
    spectra = analysis.layer_spectra["layer"].double()
    tail = (spectra[:, 1:10] / spectra[:, :1]).mean(dim=1)  # how far σ₂…σ₁₀ stand below σ₁, per layer
    tail_rho, tail_falls = _is_decreasing(tail.tolist())
    measured["later layers are lower rank"] = (
        f"Spearman ρ(layer, mean σ₂..₁₀/σ₁) ≤ {STRONG_TREND} over the analyzed layers (partly: last < first)",
        f"ρ = {tail_rho:+.2f}; {float(tail[0]):.3f} (layer {layers[0]}) → {float(tail[-1]):.3f} (layer {layers[-1]})",
        _verdict(tail_falls, partly=bool(tail[-1] < tail[0])) if many else NOT_MEASURED)

    projections = analysis.projections(2).double().abs()  # (L, 2, 2): |uⱼ(ℓ) · uₖ(last)|
    early = max(1, len(layers) // 3)
    early_max, near_last = float(projections[:early].max()), float(projections[-2].max()) if many else math.nan
    measured["early layers' vectors differ from the last's"] = (
        f"every |projection| of u₁, u₂ on the last layer's < 0.5 in the first third of the layers (to layer "
        f"{layers[early - 1]}) and ≥ 0.5 in the layer before the last (partly: the first alone)",
        f"first third: max {early_max:.2f}; layer {layers[-2] if many else '—'}: {near_last:.2f}",
        _verdict(early_max < 0.5 and near_last >= 0.5, partly=early_max < 0.5) if many else NOT_MEASURED)

    ranks = analysis.stable_ranks("cumulative")
    rho, decreasing = _is_decreasing(ranks["layer"])
    measured["dimensionality decreases with depth"] = (
        f"Spearman ρ(layer, cumulative stable rank) ≤ {STRONG_TREND} and last < first (partly: last < first)",
        f"ρ = {rho:+.2f}; layer {layers[0]}: {ranks['layer'][0]:.2f} → layer {layers[-1]}: {ranks['layer'][-1]:.2f}",
        _verdict(decreasing and ranks["layer"][-1] < ranks["layer"][0], partly=ranks["layer"][-1] < ranks["layer"][0])
        if many else NOT_MEASURED)

    layerwise = analysis.stable_ranks("layerwise")["layer"]
    peak = int(np.argmax(layerwise))
    n_layers = layers[-1] + 1 if n_layers is None else n_layers
    measured["layer-wise dimensionality peaks near the end"] = (
        "the layer-wise stable rank of the layer output is largest in the last quarter of the layers (partly: in the "
        "last half)", f"largest at layer {layers[peak]} of {n_layers} ({layerwise[peak]:.2f})",
        _verdict(layers[peak] >= 0.75 * n_layers, partly=layers[peak] >= 0.5 * n_layers) if many else NOT_MEASURED)

    threshold = (f"{concept_word!r} in some steered (λ<1) continuation and not in the normal one, for every prompt; "
                 "λ = 1 leaves the output unchanged")
    if not steering:
        measured["steering with J⁺ of a concept"] = (threshold, "—", NOT_MEASURED)
    else:
        steered = [any(concept_appears(r, concept_word) for r in sweep if r.lam < 1) for sweep in steering]
        identity = all(r.steered_ids == r.normal_ids for sweep in steering for r in sweep if r.lam == 1)
        measured["steering with J⁺ of a concept"] = (
            threshold, f"{sum(steered)} of {len(steered)} prompts steered; λ = 1 identical: {identity}",
            _verdict(all(steered) and identity, partly=any(steered)))

    rows = []
    for claim in CLAIMS:
        threshold, value, verdict = measured[claim.name]
        all_models = claim.chapter in ("fig5", "architectures")  # one page for every model
        page = None if not page_slug else f"../{claim.chapter}/{'all-models' if all_models else page_slug}.html"
        rows.append({"claim": claim.name, "the paper": f"“{quote_text(claim.quote)}” ({claim.where})",
                     "threshold (ours)": threshold, "measured": value, "verdict": verdict,
                     "at scale": (at_scale or {}).get(claim.name, ""), "page": page})
    return pd.DataFrame(rows)


def paper_families() -> dict[str, bool]:
    """The paper's family -> whether lllm is exact on a tiny random model of it (lllm.apps.zoo.check_architecture:
    float32 and float64 errors, bitwise forward, y what lm_head reads, the ordinary J not exact)."""
    from lllm.apps.zoo import TEST_IDS, check_architecture, tiny_architecture
    from lllm.errors import LLLMError

    exact = {}
    for family, name in PAPER_FAMILIES.items():
        try:
            exact[family] = check_architecture(lambda dtype, name=name: tiny_architecture(name, dtype),
                                               TEST_IDS)["verdict"] == "exact"
        except LLLMError:  # refused
            exact[family] = False
    return exact


def at_scale_rates(df: pd.DataFrame, d: int) -> dict[str, str]:
    """claim name -> how often the claim holds over a sweep's analyzed prompts (`lllm sweep` rows), as text."""
    from scipy.stats import spearmanr

    ok = df[df["error"].isna()]
    if ok.empty:
        return {}
    n = len(ok)
    rate = lambda hits: f"{int(hits)} of {n} prompts ({hits / n:.0%})"  # noqa: E731
    out = {
        "J⁺ reconstructs y (float32)": rate((ok["reconstruction_error"] < FLOAT32_ORDER).sum()),
        "U decodes to the prediction": rate(ok["u1_matches_prediction"].sum()),
        "J⁺ᵢ are extremely low rank": rate(sum(max(r) < 0.01 * d for r in ok["token_stable_ranks"])),
    }
    decreasing = [spearmanr(np.arange(len(r)), r).statistic <= STRONG_TREND for r in ok["cumulative_stable_rank_layer"]
                  if r is not None and len(r) >= 3 and len(set(r)) > 1]
    if decreasing:
        out["dimensionality decreases with depth"] = f"{sum(decreasing)} of {len(decreasing)} prompts " \
                                                     f"({sum(decreasing) / len(decreasing):.0%}; sampled layers)"
    return out


def claims_table(table: pd.DataFrame):
    """One model's `paper_claims` as the page shows them: each verdict coloured and linked to the page of its
    measurement, every cell wrapping at page width, no index column (the claim names the row)."""
    shown = table.copy()
    links = shown.pop("page")
    shown["verdict"] = [f'<a href="{page}">{verdict}</a>' if page else verdict
                        for verdict, page in zip(shown["verdict"], links)]
    colors = [VERDICT_COLORS[v] for v in table["verdict"]]
    escaped = [c for c in shown.columns if c != "verdict"]
    styler = shown.style.format(escape="html", subset=escaped).set_properties(
        **{"text-align": "left", "white-space": "pre-wrap"})
    styler = styler.apply(lambda column: [f"background-color: {c}" for c in colors], subset=["verdict"])
    return styler.hide(axis="index")


def headline(analysis: PromptAnalysis, claims: pd.DataFrame, float64_error: float | None = None) -> dict:
    """One model's row of the landing page's table (lllm.apps.book.headline): its errors, stable ranks and the
    counts of its `paper_claims` verdicts."""
    meta, dtype = analysis.meta, dtype_name(analysis.final.jacobian.dtype)
    ranks = analysis.stable_ranks("cumulative")["layer"]
    return {
        "float32_error": meta["relative_error"] if dtype == "float32" else None,
        "float64_error": meta["relative_error"] if dtype == "float64" else float64_error,
        "ordinary_error": meta["ordinary_relative_error"],
        "max_token_stable_rank": max(meta["token_stable_rank"]), "d": analysis.final.jacobian.shape[0],
        "first_layer": analysis.layers[0], "first_rank": ranks[0],
        "last_layer": analysis.layers[-1], "last_rank": ranks[-1],
        # [verdict, count] for every verdict in VERDICT_COLORS' order, zeros included: the headline's columns
        "verdicts": [[verdict, int((claims["verdict"] == verdict).sum())] for verdict in VERDICT_COLORS],
    }
