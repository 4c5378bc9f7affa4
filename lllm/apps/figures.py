"""The book's multi-panel figures, drawn from the data a page computed: each function returns the Figure, so that a
notebook stays thin (parameters, one call, `notebook.show_figure`) and a script can draw the same figure.

- `generation_figure` (Fig 2), `magnitudes_figure` (Fig 4A), `layers_figure` (Fig 6), `decoding_grid_figure`
  (Tables 1–3), `steering_figure` (Table 4), `reconstruction_and_spectra_figure` (Fig A1), `splits_figure`
  (Linearization), `verdict_figure` (Paper vs. this book), `at_scale_figure` (At scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.colors import ListedColormap

from lllm.analyses.generation import GenerationResult
from lllm.analyses.pipeline import PromptAnalysis
from lllm.analyses.steering import SteeringResult
from lllm.kernel.jacobian import JacobianResult
from lllm.apps import at_scale
from lllm.apps.layer_decodings import DecodingGrid
from lllm.apps.claims import VERDICT_COLORS
from lllm.apps.plots import plot_reconstruction, plot_token_spectra, predicted_token
from lllm.apps.steering_tables import concept_appears, tokens_changed


def layers_figure(analysis: PromptAnalysis, title: str, n_singular: int = 60) -> plt.Figure:
    """Fig 6: A normalized spectra of the cumulative J⁺ per layer; B each layer's u₁, u₂ on the last layer's;
    C the cumulative and D the layer-wise stable ranks of the layer, attention and MLP outputs."""
    layers = analysis.layers
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    cmap, norm = plt.cm.viridis, plt.Normalize(min(layers), max(layers))

    ax = axes[0, 0]
    for ell, spectrum in zip(layers, analysis.layer_spectra["layer"].double()):
        ax.semilogy(np.arange(1, n_singular + 1), (spectrum / spectrum[0])[:n_singular], color=cmap(norm(ell)), lw=1)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    ax.set(title="A. normalized spectra of the cumulative J⁺ (layer output)", xlabel="singular value index",
           ylabel="σ / σ₁")

    ax = axes[0, 1]
    projections = analysis.projections(2).double().numpy()  # (L, 2, 2)
    for j, marker in enumerate(("o", "s")):
        ax.plot(projections[:, j, 0], projections[:, j, 1], color="lightgray", lw=0.8, zorder=0)
        ax.scatter(projections[:, j, 0], projections[:, j, 1], c=layers, cmap=cmap, norm=norm, marker=marker, s=28)
        ax.plot([], [], marker, color="gray", label=f"u{j + 1} of each layer (color: layer)")
        for ell, (x, y) in zip(layers, projections[:, j]):
            if ell == layers[-1] or (abs(x) > 0.2 or abs(y) > 0.2):  # label the points that left the origin
                ax.annotate(f"{ell}", (x, y), fontsize=7, xytext=(4, -3), textcoords="offset points")
    ax.axhline(0, color="gray", lw=0.5), ax.axvline(0, color="gray", lw=0.5)
    ax.set(title="B. projection onto the last layer's u₁, u₂", xlabel="· u₁ (last layer)",
           ylabel="· u₂ (last layer)", xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal")
    ax.legend(fontsize=7)

    for ax, kind, letter in ((axes[1, 0], "cumulative", "C"), (axes[1, 1], "layerwise", "D")):
        for component, values in analysis.stable_ranks(kind).items():
            ax.plot(layers, values, marker="o", ms=3, label=component)
        what = "cumulative (embeddings → output)" if kind == "cumulative" else "layer-wise (layer ℓ alone)"
        ax.set(title=f"{letter}. stable rank, {what}", xlabel="layer", ylabel="stable rank R", yscale="log")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def generation_figure(generation: GenerationResult, title: str, crop: int = 48) -> plt.Figure:
    """Fig 2: one row per generation step, the crop × crop corner of every J⁺ᵢ (own colour scale) and their
    singular values."""
    steps = generation.steps
    width = max(len(step.jacobian.tokens) for step in steps)
    fig, axes = plt.subplots(len(steps), width + 1, figsize=(2.3 * (width + 1) + 1.5, 2.5 * len(steps)),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * width + [1.6]})
    for number, (row, step) in enumerate(zip(axes, steps), start=1):
        blocks = step.jacobian.jacobian[:crop, :, :crop].permute(1, 0, 2).double()  # (T, crop, crop)
        for i, ax in enumerate(row[:width]):
            ax.set_xticks([]), ax.set_yticks([])
            if i >= len(blocks):
                ax.axis("off")
                continue
            scale = float(blocks[i].abs().flatten().quantile(0.99))  # each block on its own scale, robust to outliers
            ax.imshow(blocks[i].numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
            ax.set_title(f"J⁺{i}: {step.jacobian.tokens[i]!r}", fontsize=8)
        row[0].set_ylabel(f"step {number}\n→ {step.token!r}", fontsize=9)
        spec = row[-1]
        for i, values in enumerate(step.spectrum.double().numpy()):
            spec.semilogy(np.arange(1, len(values) + 1), values, marker=".", ms=3, lw=1,
                          label=f"J⁺{i} {step.jacobian.tokens[i]!r}")
        spec.set_title(f"spectra (error {step.jacobian.relative_error:.1e})", fontsize=8)
        spec.set_xlabel("index", fontsize=8)
        spec.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def steering_figure(sweeps: Mapping[str, Sequence[SteeringResult]], word: str, n_tokens: int,
                    title: str) -> plt.Figure:
    """Table 4 as a picture: per prompt (rows) and λ (columns), how many generated tokens differ from the normal
    continuation; ★ where the concept word appears."""
    changed = np.array([tokens_changed(sweep) for sweep in sweeps.values()])  # (prompts, λs)
    lams = [r.lam for r in next(iter(sweeps.values()))]
    fig, ax = plt.subplots(figsize=(1.3 * len(lams) + 3, 0.8 * len(sweeps) + 1.6))
    ax.imshow(changed, cmap="Oranges", vmin=0, vmax=n_tokens, aspect="auto")
    for i, sweep in enumerate(sweeps.values()):
        for j, r in enumerate(sweep):
            mark = "★" if concept_appears(r, word) else ""
            ax.text(j, i, f"{changed[i, j]}{mark}", ha="center", va="center", fontsize=10,
                    color="white" if changed[i, j] > n_tokens / 2 else "black")
    ax.set_xticks(range(len(lams)), [f"λ={lam:g}" for lam in lams])
    ax.set_yticks(range(len(sweeps)), list(sweeps))
    ax.set_title(f"{title}\ngenerated tokens (of {n_tokens}) that differ from the normal continuation; ★: "
                 f"{word.lower()!r} appears", fontsize=9)
    fig.tight_layout()
    return fig


def decoding_grid_figure(grid: DecodingGrid, title: str) -> plt.Figure:
    """Tables 1–3 as a picture: the decoded top singular vectors of each layer, coloured by log₁₀ σ, the cells that
    decode to a salient word highlighted."""
    fig, ax = plt.subplots(figsize=(3.2 * grid.sigma.shape[1] + 1.5, 0.42 * len(grid.layers) + 1.6))
    image = ax.imshow(np.log10(grid.sigma), cmap="Blues", aspect="auto", alpha=0.6)
    for row, (texts, hits) in enumerate(zip(grid.text, grid.hit)):
        for col, (text, hit) in enumerate(zip(texts, hits)):
            ax.text(col, row, text, ha="center", va="center", fontsize=8, fontweight="bold" if hit else "normal",
                    bbox={"facecolor": "#ffe08a", "edgecolor": "none", "pad": 1} if hit else None)
    ax.set_xticks(range(grid.sigma.shape[1]), [f"u{j + 1}" for j in range(grid.sigma.shape[1])])
    ax.set_yticks(range(len(grid.layers)), [f"layer {ell}" for ell in grid.layers])
    fig.colorbar(image, ax=ax, label="log₁₀ σ")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def verdict_figure(table: pd.DataFrame, title: str) -> tuple[plt.Figure, pd.DataFrame]:
    """The claims × models verdict grid of `claims.paper_claims` tables (indexed by model, #); and the grid."""
    verdicts = table.reset_index().pivot(index="claim", columns="model", values="verdict")
    verdicts = verdicts.loc[list(dict.fromkeys(table["claim"]))]  # the claims in the paper's order
    order = list(VERDICT_COLORS)
    fig, ax = plt.subplots(figsize=(2.6 * verdicts.shape[1] + 4.5, 0.42 * len(verdicts) + 1.5))
    ax.imshow([[order.index(v) for v in row] for row in verdicts.to_numpy()], aspect="auto",
              cmap=ListedColormap(list(VERDICT_COLORS.values())), vmin=-0.5, vmax=len(order) - 0.5)
    for (i, j), verdict in np.ndenumerate(verdicts.to_numpy()):
        ax.text(j, i, verdict, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(verdicts.shape[1]), verdicts.columns)
    ax.set_yticks(range(len(verdicts)), verdicts.index, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=9, pad=14)
    fig.tight_layout()
    return fig, verdicts


def at_scale_figure(sweeps: Mapping[str, pd.DataFrame], summaries: Mapping[str, dict], title: str) -> plt.Figure:
    """At scale: A the final J⁺'s reconstruction errors; B how often U₁ (or U₁…U₃) decodes to the prediction;
    C the cumulative stable rank by layer (median, IQR); D the median stable rank by relative depth."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    log_errors = {name: at_scale.log_errors(df) for name, df in sweeps.items()}
    bins = np.histogram_bin_edges(np.concatenate(list(log_errors.values())), bins=30)  # shared, so comparable
    for name, values in log_errors.items():
        ax.hist(values, bins=bins, alpha=0.6, label=name)
    ax.set(title="A. reconstruction error of the final J⁺", xlabel="log₁₀ relative error", ylabel="prompts")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    x = np.arange(len(summaries))
    ax.bar(x - 0.2, [s["u1_match_rate"] for s in summaries.values()], width=0.4, label="U₁")
    ax.bar(x + 0.2, [s["u_top3_match_rate"] for s in summaries.values()], width=0.4, label="any of U₁, U₂, U₃")
    ax.set_xticks(x, list(summaries), rotation=20, ha="right")  # model names are long: they would run together
    ax.set(title="B. the last token's top singular vectors decode to the prediction", ylabel="fraction of prompts",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    for name, df in sweeps.items():
        quartiles = at_scale.stable_rank_by_layer(summaries[name])  # layer -> 25%, 50%, 75%
        if quartiles.empty:
            continue
        axes[1, 0].plot(quartiles.index, quartiles["50%"].values, marker="o", ms=3, label=name)
        axes[1, 0].fill_between(quartiles.index, quartiles["25%"], quartiles["75%"], alpha=0.2)
        by_depth = at_scale.stable_rank_by_depth(df)
        axes[1, 1].plot(by_depth.index, by_depth.values, marker="o", ms=3, label=name)
    axes[1, 0].set(title="C. cumulative stable rank by layer (median, IQR)", xlabel="layer", ylabel="stable rank",
                   yscale="log")
    axes[1, 1].set(title="D. median stable rank by relative depth", xlabel="depth (layer + 1) / layers",
                   ylabel="stable rank", yscale="log")
    for ax in axes[1]:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def magnitudes_figure(features: Sequence, labels: Sequence[str], title: str) -> plt.Figure:
    """Fig 4A's magnitudes: the sorted row and column norms of every J⁺ᵢ (`lllm.row_col_features` of each)."""
    fig, (ax_rows, ax_cols) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(features)))
    for color, label, f in zip(colors, labels, features):
        ax_rows.semilogy(np.sort(f.row_norms.double().numpy())[::-1], color=color, lw=1.2, label=label)
        ax_cols.semilogy(np.sort(f.col_norms.double().numpy())[::-1], color=color, lw=1.2, label=label)
    ax_rows.set(title="row norms ‖J⁺ᵢ[r, :]‖, sorted", xlabel="rank", ylabel="norm")
    ax_cols.set(title="column norms ‖J⁺ᵢ[:, c]‖, sorted", xlabel="rank", ylabel="norm")
    ax_cols.legend(fontsize=7, title="input token i", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def reconstruction_and_spectra_figure(analysis: PromptAnalysis, title: str) -> plt.Figure:
    """Fig 3 and Fig 4B side by side for one model (Fig A1)."""
    meta = analysis.meta
    fig, (ax_fit, ax_spectra) = plt.subplots(1, 2, figsize=(12, 4.8))
    plot_reconstruction(ax_fit, analysis.final, analysis.ordinary_reconstruction)
    ax_fit.set_title(f"Fig 3: J⁺ error {meta['relative_error']:.1e}, J error {meta['ordinary_relative_error']:.2g}")
    plot_token_spectra(ax_spectra, analysis)
    ax_spectra.set_title(f"Fig 4B: spectra of J⁺ᵢ, predicts {predicted_token(analysis)!r}")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def split_differences(first: JacobianResult, second: JacobianResult) -> list[float]:
    """‖J⁺ᵢ(first) − J⁺ᵢ(second)‖ / ‖J⁺ᵢ(first)‖ for every input token i."""
    return [float((first.block(i) - second.block(i)).norm() / first.block(i).norm()) for i in range(len(first.tokens))]


def splits_figure(splits: Mapping[str, JacobianResult], title: str) -> plt.Figure:
    """The two MLP splits: the last token's spectrum under each, and how much each J⁺ᵢ differs between them."""
    (first_name, first), (second_name, second) = splits.items()
    differences = split_differences(first, second)
    fig, (ax_spec, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.3))
    for split, result in splits.items():
        spectrum = torch.linalg.svdvals(result.block(-1)).double().numpy()[:60]
        ax_spec.semilogy(np.arange(1, len(spectrum) + 1), spectrum, marker=".", lw=1,
                         label=f"{split} (error {result.relative_error:.1e})")
    ax_spec.set(title=f"spectrum of the last token's J⁺ ({first.tokens[-1]!r})", xlabel="index",
                ylabel="singular value")
    ax_spec.legend(fontsize=8)
    ax_diff.bar(range(len(differences)), differences, color="tab:purple")
    ax_diff.set_xticks(range(len(differences)), [repr(t) for t in first.tokens], rotation=30, fontsize=8)
    ax_diff.set(title=f"‖J⁺ᵢ({first_name}) − J⁺ᵢ({second_name})‖ / ‖J⁺ᵢ({first_name})‖", ylabel="relative difference")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
