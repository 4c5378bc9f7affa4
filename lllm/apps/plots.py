"""Shared helpers of the paper notebooks (notebooks/*.ipynb): cached computations, figures and tables.

The notebooks stay thin: they set parameters, call these functions and lllm, and plot. Everything
that two notebooks need lives here, so that every page computes a quantity the same way:

- `analysis_layers`, `load_analysis`: the one `cached_analyze` configuration all per-prompt pages
  share (all layers, or every 10th layer and the last in the fast configuration), so that the
  analysis of a (model, prompt, dtype) is computed once for the whole book.
- `cached_jacobian`, `cached_lambda_sweep`: the float64 J⁺ (Fig 3, Paper vs. this book) and the
  steering sweeps (Table 4, Paper vs. this book) through the same results cache.
- `save_figure`, `figure_title`: every figure saved as PNG and SVG, titled with model and prompt.
- `plot_reconstruction` (Fig 3, A1), `plot_token_spectra` (Fig 4B, 5, A1), `svd_decoding_table`
  (Fig 4B, 5, A1), `layer_decoding_table` and `highlight` (Tables 1–3).
- `paper_claims`: the "Paper vs. this book" verdicts, each a measured number against an explicit
  threshold.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from lllm.analyses.pipeline import PromptAnalysis, cached_analyze
from lllm.errors import LLLMError
from lllm.kernel.jacobian import JacobianResult, detached_jacobian
from lllm.analyses.steering import SteeringResult, default_layer, lambda_sweep
from lllm.apps.steering_tables import concept_appears
from lllm.io.codecs import computation_fields, dtype_name, record_to_result, result_to_record
from lllm.io.store import ResultCache

FIGURE_FORMATS = ("png", "svg")
FAST_LAYER_STRIDE = 10  # the fast configuration analyzes every 10th layer and the last
# Steering in the fast configuration (Table 4 and Paper vs. this book share it, and so their cached sweeps):
# the λ = 1 identity check and one steered λ, three generated tokens.
FAST_STEERING_LAMS, FAST_STEERING_TOKENS = [1.0, 0.4], 3
JACOBIAN_KIND = "notebook-jacobian"
STEERING_KIND = "notebook-steering"


# ---------------------------------------------------------------------------------------------
# Cached computations shared by several notebooks
# ---------------------------------------------------------------------------------------------


def analysis_layers(n_layers: int, fast: bool) -> list[int] | None:
    """The layers every notebook analyzes: None (all) or, when fast, every 10th layer and the last."""
    if n_layers < 1:
        raise LLLMError(f"a model needs at least one layer, got {n_layers}")
    if not fast:
        return None
    return sorted(set(range(0, n_layers, FAST_LAYER_STRIDE)) | {n_layers - 1})


def load_analysis(model: nn.Module, tokenizer, prompt: str, fast: bool,
                  layers: list[int] | None = None) -> PromptAnalysis:
    """The cached `analyze` of prompt in the configuration shared by every notebook (see `analysis_layers`), or of
    the given layers only; either way the layer Jacobians are reduced group by group within the memory budget."""
    layers = analysis_layers(model.config.num_hidden_layers, fast) if layers is None else list(layers)
    return cached_analyze(model, tokenizer, prompt, layers=layers, progress=False)


def cached_jacobian(model: nn.Module, tokenizer, prompt: str, *, mlp_split: str = "activation") -> JacobianResult:
    """The detached J⁺ of prompt's last output embedding, through the results cache (computed once)."""
    options = {"mlp_split": mlp_split, "position": -1}
    key = computation_fields(model, prompt, options=options)
    tensors, meta, _ = ResultCache().get_or_compute(
        JACOBIAN_KIND, key,
        lambda: result_to_record(detached_jacobian(model, tokenizer, prompt, progress=False, mlp_split=mlp_split),
                                 model=model, prompt=prompt, options=options),
    )
    return record_to_result(tensors, meta)


def cached_lambda_sweep(
    model: nn.Module, tokenizer, concept: str, prompt: str, lams: Sequence[float], *, layer: int | None = None,
    n_tokens: int = 8,
) -> list[SteeringResult]:
    """`lllm.analyses.steering.lambda_sweep` through the results cache: one SteeringResult per λ."""
    layer = default_layer(model) if layer is None else layer
    options = {"concept": concept, "lams": [float(lam) for lam in lams], "layer": layer, "n_tokens": n_tokens,
               "format": 2}  # 2: with the continuations alone (decoded after the prompt's own ids)

    def compute() -> tuple[dict, dict]:
        results = lambda_sweep(model, tokenizer, concept, prompt, lams, layer=layer, n_tokens=n_tokens)
        meta = computation_fields(model, prompt, options=options)
        meta["steering"] = [asdict(r) for r in results]
        return {}, meta

    _, meta, _ = ResultCache().get_or_compute(STEERING_KIND, computation_fields(model, prompt, options=options),
                                              compute)
    return [SteeringResult(**r) for r in meta["steering"]]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def model_name(model: nn.Module) -> str:
    """How figures name a model: lllm's name for it (short name, hub id or file), else its class."""
    source = getattr(model, "lllm_source", None)
    return source["name"] if isinstance(source, dict) and source.get("name") else type(model).__name__


def figure_title(model: nn.Module | str, prompt: str | None, detail: str = "") -> str:
    """'<model> · "<prompt>" · <detail>': the title line every figure carries."""
    name = model if isinstance(model, str) else model_name(model)
    parts = [name] + ([f"“{prompt}”"] if prompt is not None else []) + ([detail] if detail else [])
    return " · ".join(parts)


def save_figure(fig: plt.Figure, output_dir: str | os.PathLike, name: str) -> list[Path]:
    """Save fig as <output_dir>/<name>.png and .svg (the directory is created); the paths written."""
    if not name or "/" in name or name.startswith("."):
        raise LLLMError(f"figure name {name!r} must be a plain file stem such as 'fig3_reconstruction'")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{fmt}" for fmt in FIGURE_FORMATS]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=120 if path.suffix == ".png" else None)
    return paths


def plot_reconstruction(ax: plt.Axes, result: JacobianResult, ordinary: torch.Tensor | None) -> None:
    """Fig 3 on ax: y (d,) against Σ J⁺ᵢxᵢ (+c), on the identity line, and the ordinary Σ Jᵢxᵢ if given."""
    y = result.output.double().numpy()
    if ordinary is not None:
        err = float(np.std(y - ordinary.double().numpy()) / np.std(y))
        ax.scatter(y, ordinary.double().numpy(), s=6, alpha=0.6, color="tab:blue",
                   label=f"ordinary J (error {err:.2g})")
    ax.scatter(y, result.reconstruction().double().numpy(), s=6, alpha=0.8, color="tab:red",
               label=f"detached J⁺ (error {result.relative_error:.1e})")
    ax.axline((0, 0), slope=1, color="gray", lw=0.8, ls="--", zorder=0)
    ax.set_xlabel("output embedding y")
    ax.set_ylabel("Jacobian reconstruction")
    ax.legend(loc="upper left", fontsize=8, markerscale=2)


def plot_token_spectra(ax: plt.Axes, analysis: PromptAnalysis, k: int | None = 50) -> None:
    """Fig 4B/5 spectra on ax: the top k singular values of every J⁺ᵢ, one line per input token, log scale."""
    spectra = analysis.token_spectra.double().numpy()  # (T, d)
    k = spectra.shape[1] if k is None else min(k, spectra.shape[1])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(spectra)))
    for i, (spectrum, token) in enumerate(zip(spectra, analysis.meta["tokens"])):
        ax.plot(np.arange(1, k + 1), spectrum[:k], marker="o", ms=2.5, lw=1, color=colors[i],
                label=f"{i}: {token!r}")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value of J⁺ᵢ")
    ax.legend(fontsize=7, ncol=2 if len(spectra) > 6 else 1, title="input token i", title_fontsize=7)


def token_text(token: str) -> str:
    """A token as a table shows it: surrounding spaces dropped, a token of only whitespace as its repr."""
    return token.strip() if token.strip() else repr(token)


def tokens_text(decoded: dict, n: int = 3) -> str:
    """'a · b · c': the first n tokens of a decoded vector (lllm.Decoded.to_dict())."""
    return " · ".join(token_text(t) for t in decoded["tokens"][:n])


def svd_decoding_table(analysis: PromptAnalysis, n_tokens: int = 3) -> pd.DataFrame:
    """Fig 4B as a table: per input token and singular vector, σ, U decoded (lm_head) and V decoded (cosine NN)."""
    rows = []
    for i, (token, entries) in enumerate(zip(analysis.meta["tokens"], analysis.meta["token_decodings"])):
        for entry in entries:
            rows.append({"token": f"{i}: {token!r}", "vector": entry["index"] + 1, "σ": entry["singular_value"],
                         "U → output tokens": tokens_text(entry["u"], n_tokens),
                         "V → input tokens": tokens_text(entry["v"], n_tokens)})
    return pd.DataFrame(rows).set_index(["token", "vector"])


def layer_decoding_table(analysis: PromptAnalysis, layers: Sequence[int] | None = None, n_tokens: int = 3
                         ) -> pd.DataFrame:
    """Tables 1–3: per layer, the top singular vectors of the cumulative layer-output J⁺ decoded through lm_head."""
    wanted = analysis.layers if layers is None else list(layers)
    unknown = sorted(set(wanted) - set(analysis.layers))
    if unknown:
        raise LLLMError(f"layers {unknown} were not analyzed; available: {analysis.layers}")
    table = {}
    for ell in wanted:
        entries = analysis.meta["layer_decodings"][analysis.layers.index(ell)]
        table[f"layer {ell}"] = {f"σ{j + 1} → tokens": f"{tokens_text(e, n_tokens)}  ({e['singular_value']:.3g})"
                                 for j, e in enumerate(entries)}
    return pd.DataFrame.from_dict(table, orient="index")


def styled(table: pd.DataFrame):
    """A pandas Styler of table, left-aligned, its cells HTML-escaped (tokens such as '<|im_start|>' are text) and
    their spaces kept (a token's leading space shows) but wrapping at page width."""
    return table.style.format(escape="html").set_properties(**{"text-align": "left", "white-space": "pre-wrap"})


def highlight(table: pd.DataFrame, words: Sequence[str]):
    """`styled(table)` with the cells containing any of words as a whole word (case-insensitive) highlighted."""
    needles = {w.strip().lower() for w in words if w.strip()}

    def style(cell) -> str:
        # whole words and punctuation runs, so that the prediction "the" does not light up "there"
        found = set(re.findall(r"\w+|[^\w\s]+", str(cell).lower()))
        return "background-color: #ffe08a; font-weight: bold" if needles & found else ""

    return styled(table).map(style)


def predicted_token(analysis: PromptAnalysis) -> str:
    """The greedy next token of the analyzed prompt."""
    return analysis.meta["next_tokens"][0]["token"]


# ---------------------------------------------------------------------------------------------
# Paper vs. this book
# ---------------------------------------------------------------------------------------------

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_MEASURED = "reproduced", "partly", "not reproduced", "not measured"
VERDICT_COLORS = {REPRODUCED: "#c8ecc8", PARTLY: "#fff0b3", NOT_REPRODUCED: "#f7c6c6", NOT_MEASURED: "#e4e4e4"}


def _verdict(ok: bool | None, partly: bool = False) -> str:
    if ok is None:
        return NOT_MEASURED
    return REPRODUCED if ok else PARTLY if partly else NOT_REPRODUCED


# A trend with depth counts as the paper's when the rank correlation with the layer is at least this strong: a
# model whose values merely end lower than they start, or wander (ρ = −0.14), shows it only partly.
STRONG_TREND = -0.5


def _is_decreasing(values: Sequence[float]) -> tuple[float, bool]:
    """Spearman ρ between position and values, and whether ρ ≤ STRONG_TREND (at least 3 values)."""
    from scipy.stats import spearmanr

    if len(values) < 3:
        return math.nan, False
    rho = float(spearmanr(np.arange(len(values)), values).statistic)
    return rho, rho <= STRONG_TREND


def paper_claims(
    analysis: PromptAnalysis,
    *,
    float64_error: float | None = None,
    steering: Sequence[Sequence] | None = None,
    concept_word: str = "Golden",
    bos_token_id: int | None = None,
) -> pd.DataFrame:
    """One row per claim of the paper: what it says, the threshold, our measurement, the verdict.

    analysis: the model's PromptAnalysis in the working dtype (float32 expected for the error claim).
    float64_error: the float64 reconstruction error, or None when it was not measured.
    steering: per steered prompt, its λ sweep (SteeringResults), or None when not run.
    bos_token_id: the tokenizer's BOS token; the BOS claim is measured only on a prompt that starts with it.
    """
    meta = analysis.meta
    dtype = dtype_name(analysis.final.jacobian.dtype)
    rows = []

    def claim(name: str, paper: str, threshold: str, measured: str, verdict: str) -> None:
        rows.append({"claim": name, "paper": paper, "threshold (ours)": threshold, "measured": measured,
                     "verdict": verdict})

    err = meta["relative_error"]
    claim("J⁺ reconstructs y", "relative error ≈ 1e-6 in float32", "error < 1e-5 in float32",
          f"{err:.2e} ({dtype})", _verdict(err < 1e-5) if dtype == "float32" else NOT_MEASURED)
    claim("float64 makes it exact", "no figure given (the paper reports float32 and float16)",
          "error < 1e-12 in float64",
          "—" if float64_error is None else f"{float64_error:.2e}",
          _verdict(None if float64_error is None else float64_error < 1e-12))
    ordinary = meta["ordinary_relative_error"]
    claim("the ordinary J does not", "its reconstruction does not fall on the identity line (Fig. 3)",
          "ordinary error > 0.1 (partly: > 1000 × the J⁺ error)",
          f"{ordinary:.3g}", _verdict(ordinary > 0.1, partly=ordinary > 1e3 * err))

    token_ranks = meta["token_stable_rank"]
    d = analysis.final.jacobian.shape[0]
    worst = max(token_ranks)
    claim("J⁺ᵢ are extremely low rank", "few singular vectors carry the map",
          f"every stable rank < 1% of d = {d} (partly: < 10%)",
          f"max stable rank {worst:.2f} over {len(token_ranks)} tokens", _verdict(worst < 0.01 * d,
                                                                                    partly=worst < 0.1 * d))

    predicted = meta["next_tokens"][0]["id"]
    last = meta["token_decodings"][-1]
    u_top5 = [i for e in last for i in e["u"]["ids"]]
    claim("top U decodes to the prediction", "U₁ of the last token decodes to the predicted token",
          "U₁'s top token = greedy prediction (partly: in the top 5 of U₁…U₃)",
          f"prediction {meta['next_tokens'][0]['token']!r}, U₁ → {last[0]['u']['tokens'][0]!r}",
          _verdict(last[0]["u"]["ids"][0] == predicted, partly=predicted in u_top5))

    input_ids = set(meta["token_ids"])
    v_hits = [any(i in input_ids for i in entries[0]["v"]["ids"]) for entries in meta["token_decodings"]]
    claim("V decodes to input tokens", "V of J⁺ᵢ decodes to variants of the input tokens",
          "V₁ of every J⁺ᵢ has an input token among its top 5 (partly: at least half)",
          f"{sum(v_hits)} of {len(v_hits)} tokens", _verdict(all(v_hits), partly=2 * sum(v_hits) >= len(v_hits)))

    first = float(analysis.token_spectra[0, 0])
    biggest = int(analysis.token_spectra[:, 0].argmax())
    starts_with_bos = bos_token_id is not None and meta["token_ids"][0] == bos_token_id
    claim("the first token has the largest spectrum", "the first (BOS) token's spectrum has the highest magnitude",
          "argmaxᵢ σ₁(J⁺ᵢ) = 0, on a prompt that starts with the BOS token",
          f"largest σ₁ at token {biggest} {meta['tokens'][biggest]!r} ({float(analysis.token_spectra[biggest, 0]):.3g};"
          f" token 0: {first:.3g})" if starts_with_bos else "— (the prompt has no BOS token)",
          _verdict(biggest == 0) if starts_with_bos else NOT_MEASURED)

    ranks = analysis.stable_ranks("cumulative")
    layers = analysis.layers
    rho, decreasing = _is_decreasing(ranks["layer"])
    claim("dimensionality decreases with depth", "cumulative stable rank falls layer by layer (Fig 6C)",
          f"Spearman ρ(layer, stable rank) ≤ {STRONG_TREND} and last < first (partly: last < first)",
          f"ρ = {rho:+.2f}; layer {layers[0]}: {ranks['layer'][0]:.2f} → "
          f"layer {layers[-1]}: {ranks['layer'][-1]:.2f}",
          _verdict(decreasing and ranks["layer"][-1] < ranks["layer"][0],
                   partly=ranks["layer"][-1] < ranks["layer"][0]) if len(layers) >= 3 else NOT_MEASURED)

    spectra = analysis.layer_spectra["layer"].double()
    tail = (spectra[:, 1:10] / spectra[:, :1]).mean(dim=1)  # how far σ₂…σ₁₀ stand below σ₁, per layer
    tail_rho, tail_falls = _is_decreasing(tail.tolist())
    claim("later layers are lower rank", "normalized spectra fall faster in later layers (Fig 6A)",
          f"Spearman ρ(layer, mean σ₂..₁₀/σ₁) ≤ {STRONG_TREND} over the analyzed layers (partly: last < first)",
          f"ρ = {tail_rho:+.2f}; {float(tail[0]):.3f} (layer {layers[0]}) → {float(tail[-1]):.3f} (layer {layers[-1]})",
          _verdict(tail_falls, partly=bool(tail[-1] < tail[0])) if len(layers) >= 3 else NOT_MEASURED)

    decodes = [any(e["ids"][0] == predicted for e in entries) for entries in meta["layer_decodings"]]
    emerged = [ell for ell, hit in zip(layers, decodes) if hit]
    half = layers[len(layers) // 2]
    before_last = [ell for ell in emerged if ell != layers[-1]]  # the last layer's map is lm_head's own: not evidence
    claim("decodings become intelligible in later layers", "the prediction appears in later-layer decodings "
          "(Tables 1–3)", f"the prediction is the top token of a top-3 vector in some layer from {half} on, before the "
          f"last, and not in layer {layers[0]} (partly: in the last layer only, or also early)",
          f"layers where it appears: {emerged or 'none'}",
          _verdict(bool(before_last) and min(emerged) >= half and not decodes[0], partly=bool(emerged)))

    if steering is None:
        claim("steering with J⁺ of a concept", "the concept appears in steered continuations (Table 4)",
              f"{concept_word!r} in some steered (λ<1) continuation and not in the normal one", "—", NOT_MEASURED)
    else:
        steered = [any(concept_appears(r, concept_word) for r in sweep if r.lam < 1) for sweep in steering]
        identity = all(r.steered_ids == r.normal_ids for sweep in steering for r in sweep if r.lam == 1)
        claim("steering with J⁺ of a concept", "the concept appears in steered continuations (Table 4)",
              f"{concept_word!r} in some steered (λ<1) continuation and not in the normal one, for every prompt; "
              "λ = 1 leaves the output unchanged",
              f"{sum(steered)} of {len(steered)} prompts steered; λ = 1 identical: {identity}",
              _verdict(all(steered) and identity, partly=any(steered)))
    return pd.DataFrame(rows)
