"""The op-level linearization's cost beside the class-name adapter path, in one run (issue: any decoder).

    OMP_NUM_THREADS=1 python benchmarks/oplevel_cost.py [--model smollm2-135m] [--tokens 7] [--reps 3]

Times, both ways and alternating: the final J⁺ (one forward, batched reverse rows, c), and the cumulative forward
sweep (every layer, layer/attention/MLP outputs, replayed network on basis vectors). Reports medians, their ratio,
and how far the two results differ.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lllm
from lllm import layers
from lllm.jacobian import bias_term, embed, final_hidden, reverse_jacobian
from lllm.linearize import detached

SWEEP_OPTIONS: dict = {}  # e.g. chunk_size, from --chunk-size
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


def sweep(model, tokenizer, ids, op_level: bool):
    """The cumulative forward sweep through the op-level replay (op_level) or the family adapter's replay."""
    original = layers._has_adapter
    layers._has_adapter = (lambda model: False) if op_level else original
    try:
        return lllm.cumulative_jacobians(model, tokenizer, ids, method="forward", progress=False, **SWEEP_OPTIONS)
    finally:
        layers._has_adapter = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sweep-reps", type=int, default=1)
    parser.add_argument("--cases", default="final,sweep", help="comma-separated subset of final,sweep")
    parser.add_argument("--chunk-size", type=int, help="basis vectors per replayed pass (default: lllm's)")
    args = parser.parse_args()
    if args.chunk_size:
        SWEEP_OPTIONS["chunk_size"] = args.chunk_size
    model, tokenizer = lllm.load(args.model)
    ids = tokenizer(PROMPT)["input_ids"][: args.tokens]
    print(f"model {args.model}, T = {len(ids)}, torch threads {torch.get_num_threads()}")
    cases = {
        "final J⁺": (args.reps, lambda: lllm.detached_jacobian(model, tokenizer, ids, progress=False).jacobian,
                     lambda: adapter_jacobian(model, ids)),
        "cumulative forward sweep": (args.sweep_reps, lambda: sweep(model, tokenizer, ids, True), lambda: sweep(model, tokenizer, ids, False)),
    }
    chosen = {"final": "final J⁺", "sweep": "cumulative forward sweep"}
    for case, (reps, op_level, adapter) in ((chosen[c], cases[chosen[c]]) for c in args.cases.split(",")):
        times, results = {"op-level": [], "adapter": []}, {}
        for _ in range(reps):  # alternate, so that both see the same machine load
            for name, fn in (("op-level", op_level), ("adapter", adapter)):
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)
        medians = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"  {case}, {k:9s} median {medians[k]:.2f} s   ({', '.join(f'{t:.2f}' for t in v)})")
        print(f"  {case}: ratio op-level / adapter {medians['op-level'] / medians['adapter']:.3f}")
        a, b = results["op-level"], results["adapter"]
        if isinstance(a, torch.Tensor):
            print(f"  ‖op-level − adapter‖ / ‖adapter‖ = {((a - b).norm() / b.norm()).item():.2e}")
        else:
            gap = max(((a.jacobian[c] - b.jacobian[c]).norm() / b.jacobian[c].norm()).item() for c in a.jacobian)
            print(f"  max over components ‖op-level − adapter‖ / ‖adapter‖ = {gap:.2e}")


if __name__ == "__main__":
    main()
