"""The op-level linearization's cost beside the class-name adapter path it replaced, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/oplevel_cost.py [--model smollm2-135m] [--reps 3] [--tokens 7]
                                                        [--cases final,sweep] [--adapters-commit e83847f]

The adapters were deleted with issue 12, so their path runs from a git worktree of the last commit that had
them (made under /tmp on first use). Each measurement is a fresh process of either lllm with default options,
alternating, so that both see the same machine load: the final J⁺ (`detached_jacobian`) and the cumulative
forward sweep (`cumulative_jacobians(method="forward")`, every layer, layer/attention/MLP outputs). Reports the
medians, their ratio, and how far the two results differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The bridge out of Marin is the Golden Gate Bridge, which"

# Runs in the measured process; only API that both versions have.
WORKER = """
import json, sys, time, torch, lllm
case, tokens, out, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
model, tokenizer = lllm.load(name)
ids = tokenizer({prompt!r})["input_ids"][:tokens]
lllm.detached_jacobian(model, tokenizer, ids[:2], progress=False)  # warm-up: first-call costs are not the case's
start = time.perf_counter()
if case == "final":
    result = {{"final": lllm.detached_jacobian(model, tokenizer, ids, progress=False).jacobian}}
else:
    sweep = lllm.cumulative_jacobians(model, tokenizer, ids, method="forward", progress=False)
    result = dict(sweep.jacobian)
seconds = time.perf_counter() - start
torch.save(result, out)
print(json.dumps({{"seconds": seconds, "lllm": lllm.__file__, "threads": torch.get_num_threads()}}))
"""


def worktree(commit: str) -> Path:
    """A detached git worktree of `commit` (made once), whose lllm/ the adapter runs import."""
    path = Path(tempfile.gettempdir()) / f"lllm-{commit}"
    if not (path / "lllm").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                       capture_output=True)
    return path


def measure(source: Path, case: str, tokens: int, cache: Path | None, out: Path, model: str) -> dict:
    """One fresh process of the lllm under `source`: its seconds for `case`, results saved to `out`."""
    env = {**os.environ, "PYTHONPATH": str(source), "TQDM_DISABLE": "1"}
    if cache is not None:  # the adapters' lllm writes dense copies in its own format: a cache of its own
        env["LLLM_CACHE_DIR"] = str(cache)
    code = WORKER.format(prompt=PROMPT)
    done = subprocess.run([sys.executable, "-c", code, case, str(tokens), str(out), model], env=env, cwd=source, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{source} {case} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["lllm"]).is_relative_to(source), f"imported {report['lllm']}, not the lllm under {source}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model both versions know")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=7)
    parser.add_argument("--cases", default="final,sweep", help="comma-separated subset of final,sweep")
    parser.add_argument("--adapters-commit", default="e83847f", help="the last commit with the class-name adapters")
    args = parser.parse_args()
    adapters = worktree(args.adapters_commit)
    sources = {"op-level": (REPO, None), "adapters": (adapters, adapters / ".bench-cache")}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            times = {name: [] for name in sources}
            for rep in range(args.reps):  # alternate, so that both see the same load
                for name, (source, cache) in sources.items():
                    report = measure(source, case, args.tokens, cache, Path(tmp) / f"{name}-{case}.pt", args.model)
                    times[name].append(report["seconds"])
            medians = {name: statistics.median(t) for name, t in times.items()}
            for name, t in times.items():
                print(f"{case:5s} {name:9s} median {medians[name]:7.2f} s  ({', '.join(f'{s:.2f}' for s in t)}; "
                      f"{report['threads']} thread(s))")
            a, b = (torch.load(Path(tmp) / f"{name}-{case}.pt") for name in sources)
            gap = max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)
            print(f"{case:5s} ratio op-level / adapters {medians['op-level'] / medians['adapters']:.3f}; "
                  f"max ‖op-level − adapters‖/‖adapters‖ = {gap:.2e}")


if __name__ == "__main__":
    main()
