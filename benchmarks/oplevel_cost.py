"""The op-level linearization's cost beside the class-name adapter path, in one run (issue: any decoder).

    OMP_NUM_THREADS=1 python benchmarks/oplevel_cost.py [--model smollm2-135m] [--tokens 7] [--reps 3]

Times the final J⁺ (one forward, batched reverse rows, c) both ways, alternating, and reports medians, their
ratio, and how far the two J⁺ differ. The forward sweep (layer readouts) still runs on the adapters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lllm
from lllm.jacobian import bias_term, embed, final_hidden, reverse_jacobian
from lllm.linearize import detached

PROMPT = "The bridge out of Marin is the Golden Gate Bridge, which"


def adapter_jacobian(model, ids):
    """The pre-op-level path: family adapters (patched norms/MLPs, Q/K hooks), same engine."""
    x0 = embed(model, ids)
    x = x0.clone().requires_grad_(True)
    with detached(model):
        y = final_hidden(model, x)
        jac = reverse_jacobian(y, x, 64, False, "")
        bias_term(model, x0)
    return jac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = lllm.load(args.model)
    ids = tokenizer(PROMPT)["input_ids"][: args.tokens]
    times = {"op-level": [], "adapter": []}
    results = {}
    for _ in range(args.reps):  # alternate, so that both see the same machine load
        start = time.perf_counter()
        results["op-level"] = lllm.detached_jacobian(model, tokenizer, ids, progress=False).jacobian
        times["op-level"].append(time.perf_counter() - start)
        start = time.perf_counter()
        results["adapter"] = adapter_jacobian(model, ids)
        times["adapter"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    diff = ((results["op-level"] - results["adapter"]).norm() / results["adapter"].norm()).item()
    print(f"model {args.model}, T = {len(ids)}, torch threads {torch.get_num_threads()}, {args.reps} alternating reps")
    for k, v in times.items():
        print(f"  final J⁺, {k:9s} median {medians[k]:.2f} s   ({', '.join(f'{t:.2f}' for t in v)})")
    print(f"  ratio op-level / adapter: {medians['op-level'] / medians['adapter']:.3f}")
    print(f"  ‖J⁺(op-level) − J⁺(adapter)‖ / ‖J⁺(adapter)‖ = {diff:.2e}")


if __name__ == "__main__":
    main()
