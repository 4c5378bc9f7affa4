"""Reading a finished sweep and summarizing it: the rows, the stable rank by depth in long form, and the
numbers the At scale page reports."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from lllm.errors import SweepError
from lllm.kernel.layers import COMPONENTS

from lllm.apps.sweep.parts import SCHEMA, PartStore

log = logging.getLogger("lllm.apps.sweep")


def load_sweep(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of a sweep: `<out>` if assembled, else its committed parts (a sweep still running)."""
    path = Path(path)
    if path.is_file():
        return pq.read_table(path, schema=SCHEMA).to_pandas()
    store = PartStore(path)
    if store.dir.is_dir():
        log.warning("%s is not assembled yet; reading the %d committed parts", path, len(store.parts()))
        return store.read().to_pandas()
    raise SweepError(f"{path} is neither a sweep result nor the output of a sweep in progress")


def stable_rank_long(df: pd.DataFrame) -> pd.DataFrame:
    """Cumulative stable ranks in long form: one row per (prompt_id, component, layer, depth, stable_rank)."""
    records = []
    for row in df[df["error"].isna()].itertuples():
        n_layers = max(row.layers) + 1 if len(row.layers) else 0
        for comp in COMPONENTS:
            values = getattr(row, f"cumulative_stable_rank_{comp}")
            if values is None:
                continue
            for layer, value in zip(row.layers, values):
                records.append({"prompt_id": row.prompt_id, "component": comp, "layer": int(layer),
                                "depth": (int(layer) + 1) / n_layers, "stable_rank": float(value)})
    return pd.DataFrame(records, columns=["prompt_id", "component", "layer", "depth", "stable_rank"])


def summarize_sweep(df: pd.DataFrame) -> dict[str, Any]:
    """Headline statistics of a sweep: errors, top-U match rate, stable rank by depth and its Spearman ρ."""
    from scipy.stats import spearmanr

    ok = df[df["error"].isna()]
    long = stable_rank_long(df)
    by_layer = (long.groupby(["component", "layer"])["stable_rank"]
                .describe(percentiles=[0.25, 0.5, 0.75]).reset_index()) if len(long) else long
    depth = {}
    for comp, group in long.groupby("component"):
        pooled = spearmanr(group["layer"], group["stable_rank"])
        per_prompt = [spearmanr(g["layer"], g["stable_rank"]).statistic for _, g in group.groupby("prompt_id")
                      if g["layer"].nunique() > 1]
        depth[comp] = {"spearman_rho": float(pooled.statistic), "p_value": float(pooled.pvalue),
                       "median_rho_per_prompt": float(pd.Series(per_prompt).median()) if per_prompt else None,
                       "fraction_of_prompts_decreasing": float((pd.Series(per_prompt) < 0).mean())
                       if per_prompt else None}
    errors = ok["reconstruction_error"]
    return {
        "n_prompts": len(df),
        "n_failed": int(df["error"].notna().sum()),
        "failures": df.loc[df["error"].notna(), ["prompt", "error"]].reset_index(drop=True),
        "reconstruction_error": errors.describe(percentiles=[0.5, 0.9, 0.99]).to_dict(),
        "median_reconstruction_error": float(errors.median()) if len(ok) else None,
        "u1_match_rate": float(ok["u1_matches_prediction"].mean()) if len(ok) else None,
        "u_top3_match_rate": float(pd.Series([ids[0] in u for ids, u in zip(ok["next_token_ids"], ok["u_token_ids"])])
                                   .mean()) if len(ok) else None,  # the prediction is the top token of u₁, u₂ or u₃
        "median_final_stable_rank": float(ok["stable_rank"].median()) if len(ok) else None,
        "median_tokens": float(ok["n_tokens"].median()) if len(ok) else None,
        "stable_rank_by_layer": by_layer,
        "depth_vs_stable_rank": depth,
        "seconds_per_prompt": ok["seconds"].describe().to_dict(),
        "cpu_seconds_per_prompt": ok["cpu_seconds"].describe().to_dict(),
    }
