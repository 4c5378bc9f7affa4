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
"""

from __future__ import annotations

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
from lllm.errors import LinearizationError, LLLMError, MemoryBudgetError, NumericalRangeError
from lllm.kernel.jacobian import JacobianResult, detached_jacobian, jvp_reconstruction
from lllm.kernel.precision import float32_products, uses_float32_products
from lllm.analyses.steering import SteeringResult, default_layer, lambda_sweep
from lllm.io.codecs import computation_fields, record_to_result, result_to_record
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
    """The detached J⁺ of prompt's last output embedding, through the results cache (computed once); a float16
    model on the CPU has its matrix products accumulated in float32 (`lllm.kernel.precision`)."""
    options = {"mlp_split": mlp_split, "position": -1}
    if uses_float32_products(model):  # another computation than PyTorch's own float16 products: another key
        options["products"] = "float32"

    def compute() -> tuple[dict, dict]:
        with float32_products(model):
            result = detached_jacobian(model, tokenizer, prompt, progress=False, mlp_split=mlp_split)
        return result_to_record(result, model=model, prompt=prompt, options=options)

    tensors, meta, _ = ResultCache().get_or_compute(JACOBIAN_KIND, computation_fields(model, prompt, options=options),
                                                    compute)
    return record_to_result(tensors, meta)


def _float16(model: str, prompt: str, device: torch.device) -> tuple[nn.Module, JacobianResult | str | None]:
    """(the float16 model, its cached J⁺ of prompt, or the error's text where float16 fails, or None where it does
    not fit in memory)."""
    from lllm.io.models import load

    net, tokenizer = load(model, dtype="float16", device=device)
    try:
        return net, cached_jacobian(net, tokenizer, prompt)
    except NumericalRangeError:  # evidence, shown as such (in a table column: short words that wrap)
        return net, "the model's activations overflow float16 (inf or NaN in y)"
    except LinearizationError as error:  # float16 is not exact here: evidence too
        return net, f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    except MemoryBudgetError:  # does not fit: not measured
        return net, None


def float16_jacobian(model: str, prompt: str, device: torch.device) -> JacobianResult | str | None:
    """The J⁺ of `model` (a name for lllm.load) in float16 on `device`, through the results cache; the error's text
    where float16 fails (Gemma 3 overflows it), None where it does not fit in memory."""
    return _float16(model, prompt, device)[1]


def float16_panel(model: str, prompt: str, device: torch.device
                  ) -> tuple[JacobianResult, torch.Tensor] | str | None:
    """Fig 3's float16 panel: (J⁺, the ordinary J's reconstruction Σ Jᵢxᵢ from one JVP), both with the products
    of `cached_jacobian`; the error's text or None as `float16_jacobian` gives them."""
    net, result = _float16(model, prompt, device)
    if result is None or isinstance(result, str):
        return result
    with float32_products(net):
        return result, jvp_reconstruction(net, result.inputs, detach=False)


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
    """Tables 1–3: per layer, the top singular vectors of the cumulative layer-output J⁺ decoded, as the paper's
    Input (Vⱼ, by cosine with the input embeddings, at the token where it weighs most) and Output (Uⱼ, through
    lm_head) columns."""
    wanted = analysis.layers if layers is None else list(layers)
    unknown = sorted(set(wanted) - set(analysis.layers))
    if unknown:
        raise LLLMError(f"layers {unknown} were not analyzed; available: {analysis.layers}")
    tokens = analysis.meta["tokens"]
    table = {}
    for ell in wanted:
        entries = analysis.meta["layer_decodings"][analysis.layers.index(ell)]
        row = {}
        for j, e in enumerate(entries):  # the paper's columns: Input (V), then Output (U), per vector
            if e.get("v"):
                row[f"V{j + 1} → input"] = f"{tokens_text(e['v'], n_tokens)}  (at {tokens[e['v']['token']]!r})"
            row[f"U{j + 1} → output"] = f"{tokens_text(e, n_tokens)}  (σ = {e['singular_value']:.3g})"
        table[f"layer {ell}"] = row
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
