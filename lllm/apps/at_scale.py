"""The At scale page: the `lllm sweep` output of several models, found, summarized and reduced to its plots.

The book keeps a model's sweep at <sweep_dir>/sweep-<model slug>.parquet (`lllm sweep --out`);
`summaries` are lllm.apps.sweep.summarize_sweep of each model's rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from lllm.apps.book import model_slug
from lllm.apps.sweep import load_sweep, stable_rank_long
from lllm.errors import SweepError

ERROR_FLOOR = 1e-18  # an exact reconstruction (error 0) still gets a bin on the log axis


def sweep_path(sweep_dir: str | os.PathLike, model: str) -> Path:
    """Where the book keeps a model's sweep: <sweep_dir>/sweep-<model slug>.parquet, absolute."""
    return (Path(sweep_dir) / f"sweep-{model_slug(model)}.parquet").resolve()


def load_sweeps(models: Iterable[str], sweep_dir: str | os.PathLike) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """model -> its sweep rows, for each model with an analyzed prompt; and a markdown line on each other one."""
    sweeps, missing = {}, []
    for name in models:
        path = sweep_path(sweep_dir, name)
        try:
            df = load_sweep(path)  # a sweep still running is read from its committed parts
        except SweepError:
            missing.append(f"- `{name}`: no sweep file at `{path}`; make it with "
                           f"`lllm sweep --model {name} --out {path}`")
            continue
        if df["error"].isna().any():
            sweeps[name] = df
        else:
            missing.append(f"- `{name}`: `{path}` has no analyzed prompt yet ({len(df)} rows, all failed or none)")
    return sweeps, missing


def analyzed(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the prompts that were analyzed (no error)."""
    return df[df["error"].isna()]


def summary_table(sweeps: Mapping[str, pd.DataFrame], summaries: Mapping[str, dict]) -> pd.DataFrame:
    """One column per model: prompts, failures, layers, median J⁺ error, U₁ match rate, stable rank and depth."""
    columns = {}
    for name, s in summaries.items():
        layers = sorted({ell for row in sweeps[name]["layers"] for ell in row})  # those with a cumulative J⁺
        columns[name] = {
            "prompts": s["n_prompts"], "failed": s["n_failed"], "median tokens": s["median_tokens"],
            "layers with a cumulative J⁺": ", ".join(map(str, layers)),
            "median J⁺ error": f"{s['median_reconstruction_error']:.1e}",
            "U₁ decodes to the prediction": f"{s['u1_match_rate']:.0%}",
            "median stable rank of J⁺": f"{s['median_final_stable_rank']:.2f}",
            **{f"Spearman ρ(layer, rank) {c}: pooled, per-prompt median": f"{d['spearman_rho']:+.2f}, " + (
                "–" if d["median_rho_per_prompt"] is None else f"{d['median_rho_per_prompt']:+.2f}")
               for c, d in s["depth_vs_stable_rank"].items()},
        }
    return pd.DataFrame(columns)


def log_errors(df: pd.DataFrame) -> pd.Series:
    """log₁₀ of the final J⁺ reconstruction error of every analyzed prompt."""
    return np.log10(analyzed(df)["reconstruction_error"].clip(lower=ERROR_FLOOR))


def stable_rank_by_layer(summary: dict) -> pd.DataFrame:
    """layer -> quartiles ("25%", "50%", "75%") over the prompts of the layer output's cumulative stable rank."""
    table = summary["stable_rank_by_layer"]  # (component, layer) rows; empty without any layer analyzed
    if table.empty:
        return pd.DataFrame(columns=["25%", "50%", "75%"])
    return table[table["component"] == "layer"].set_index("layer")[["25%", "50%", "75%"]]


def stable_rank_by_depth(df: pd.DataFrame) -> pd.Series:
    """Median over the prompts of the layer output's cumulative stable rank, by relative depth rounded to 0.1."""
    long = stable_rank_long(df)
    long = long[long["component"] == "layer"]
    # models of different depth share an axis: depth (layer + 1)/layers, rounded so that layers of prompts meet
    return long.assign(depth=long["depth"].round(1)).groupby("depth")["stable_rank"].median()
