"""Wall time of `lllm sweep` by engine on the first N bundled prompts, and whether the engines' rows agree.

    python benchmarks/sweep_wall_time.py [--model smollm2-135m] [--n 10] [--fast] [--engines local,dask]
        [--workers 2] [--reference book/data/sweep-smollm2-135m.parquet] [--prompts FILE] [--loader MOD:FN]

Each engine runs the same prompts into a fresh temporary output (model loading included in its wall
time, as a user sees it). Rows are compared without their timing columns: with one thread per
process they are identical across engines. --reference compares them also with the rows of the same
prompts in an earlier sweep of the same configuration. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from lllm.apps.sweep import DEFAULT_LOADER, FAST, TIMING_COLUMNS, load_sweep, read_prompts, run_sweep


def _rows(df) -> list[dict]:
    """Rows as plain Python values without the timing and position columns."""
    kept = df.drop(columns=[*TIMING_COLUMNS, "prompt_index"]).sort_values("prompt_id")
    return pa.Table.from_pandas(kept, preserve_index=False).to_pylist()


def measure(model: str, n: int, fast: bool, engines: list[str], workers: int, reference: str | None,
            prompts_file: str | None = None, loader: str = DEFAULT_LOADER) -> dict:
    """Run each engine on the first n prompts; wall and CPU seconds, and row agreement."""
    prompts = read_prompts(prompts_file)[:n]
    analysis = FAST if fast else {}
    report: dict = {"model": model, "prompts": len(prompts), "analysis": "fast" if fast else "faithful"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            start = time.perf_counter()
            df = run_sweep(model, prompts, Path(tmp) / f"{engine}.parquet", engine=engine, workers=workers,
                           loader=loader, progress=False, **analysis)
            results[engine] = df
            report[engine] = {"wall_seconds": time.perf_counter() - start,
                              "sum_prompt_cpu_seconds": float(df["cpu_seconds"].sum()),
                              "failed": int(df["error"].notna().sum())}
    rows = {engine: _rows(df) for engine, df in results.items()}
    first = rows[engines[0]]
    report["engines_agree"] = all(r == first for r in rows.values())
    if reference:
        earlier = load_sweep(reference)
        report["agrees_with_reference"] = _rows(earlier[earlier["prompt"].isin(prompts)]) == first
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--engines", default="local,dask")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference")
    parser.add_argument("--prompts", help="a prompt file instead of the bundled set")
    parser.add_argument("--loader", default=DEFAULT_LOADER, help="module:function returning (model, tokenizer)")
    args = parser.parse_args()
    report = measure(args.model, args.n, args.fast, args.engines.split(","), args.workers, args.reference,
                     args.prompts, args.loader)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
