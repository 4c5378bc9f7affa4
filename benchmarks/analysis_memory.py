"""Memory of the full per-prompt analysis, all layers at once against layer groups within a budget (issue 14).

    python benchmarks/analysis_memory.py [--d 768 --layers 24 --tokens 7 --budget-mib 160]

Two parts, written to stdout as markdown:
1. The estimate for paper-size models (configs only, no weights): the layer Jacobians an analysis would hold all
   at once (cumulative and layer-wise, three components) against one layer's, which is what
   `lllm.analyses.pipeline.analyze` needs when its memory budget holds one layer.
2. A measurement on a random Llama of the given width and depth (no download): peak RSS of `analyze` with the
   default budget (one group: every layer at once) and with a budget that holds a few layers, each in a fresh
   subprocess, with the largest differences between their stable ranks and spectra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_MODELS = {  # hidden size, layers, intermediate size: the published configs
    "Llama 3.2 3B": (3072, 28, 8192),
    "Llama 3.1 8B": (4096, 32, 14336),
}
COMPONENTS = 3  # layer, attention, MLP outputs


def jacobian_bytes(d: int, n_tokens: int, n_layers: int, item: int = 4) -> int:
    """Bytes of the cumulative and the layer-wise J⁺ (d, T, d) of every component of n_layers layers."""
    return 2 * COMPONENTS * n_layers * d * n_tokens * d * item


def tiny_llama(d: int, n_layers: int, seed: int = 0):
    """A random Llama of width d and depth n_layers with a small vocabulary and MLP (the Jacobians scale with d)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=d, num_hidden_layers=n_layers, intermediate_size=2 * d,
                                      num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 192),
                                      vocab_size=512, max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def measure(args: argparse.Namespace, budget: int | None) -> dict:
    """In this (fresh) process: peak RSS and the analysis' stable ranks and spectra with this budget."""
    import threading

    import psutil
    import torch

    from lllm.analyses.pipeline import analyze
    from lllm.apps.zoo import IdsTokenizer

    torch.set_num_threads(1)
    model = tiny_llama(args.d, args.layers)
    prompt = " ".join(str(i) for i in range(3, 3 + args.tokens))
    process, done, peak = psutil.Process(), threading.Event(), [0]
    baseline = process.memory_info().rss

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    analysis = analyze(model, IdsTokenizer(), prompt, progress=False, memory_budget=budget)
    done.set()
    sampler.join()
    return {"baseline_rss": baseline, "peak_rss": max(peak[0], process.memory_info().rss),
            "groups": analysis.meta["layer_groups"], "stable_ranks": analysis.stable_ranks("cumulative"),
            "layerwise_stable_ranks": analysis.stable_ranks("layerwise"),
            "spectra": {c: s.tolist() for c, s in analysis.layer_spectra.items()},
            "seconds": sum(analysis.meta["timings"].values())}


def in_subprocess(args: argparse.Namespace, budget: int | None) -> dict:
    """`measure` in a fresh process, so that each peak RSS starts from the same baseline."""
    command = [sys.executable, __file__, "--worker", json.dumps(budget), "--d", str(args.d), "--layers",
               str(args.layers), "--tokens", str(args.tokens)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def worst_difference(a: dict, b: dict) -> float:
    """Largest relative difference between two {component: list or nested lists} of numbers."""
    import torch

    return max(float(((torch.tensor(a[c]) - torch.tensor(b[c])).abs() / torch.tensor(a[c]).abs().max()).max())
               for c in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=7)
    parser.add_argument("--budget-mib", type=int, default=160, help="the small budget: MiB of layer Jacobians")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args, json.loads(args.worker))))
        return
    gib = 2**30
    print(f"## Layer Jacobians of a full analysis at T = {args.tokens}, float32\n")
    print("| model | d | layers | all layers at once GiB | one layer of one kind GiB |\n|---|---|---|---|---|")
    for name, (d, n_layers, _) in PAPER_MODELS.items():  # a group holds cumulative, then layer-wise, never both
        print(f"| {name} | {d} | {n_layers} | {jacobian_bytes(d, args.tokens, n_layers) / gib:.1f} | "
              f"{jacobian_bytes(d, args.tokens, 1) / 2 / gib:.2f} |")
    everything = jacobian_bytes(args.d, args.tokens, args.layers) / gib
    print(f"\n## Measured: random Llama, d = {args.d}, {args.layers} layers, T = {args.tokens} "
          f"(all layers' Jacobians: {everything:.2f} GiB), one torch thread, fresh subprocesses\n")
    one_group = in_subprocess(args, None)
    grouped = in_subprocess(args, args.budget_mib * 2**20)
    print("| memory budget | groups | peak RSS GiB | RSS above the loaded model GiB | seconds |\n|---|---|---|---|---|")
    for label, run in (("default (free memory / 3)", one_group), (f"{args.budget_mib} MiB", grouped)):
        print(f"| {label} | {len(run['groups'])} | {run['peak_rss'] / gib:.2f} | "
              f"{(run['peak_rss'] - run['baseline_rss']) / gib:.2f} | {run['seconds']:.0f} |")
    print(f"\nLargest relative difference, grouped against one group: cumulative stable ranks "
          f"{worst_difference(one_group['stable_ranks'], grouped['stable_ranks']):.1e}, layer-wise stable ranks "
          f"{worst_difference(one_group['layerwise_stable_ranks'], grouped['layerwise_stable_ranks']):.1e}, "
          f"spectra {worst_difference(one_group['spectra'], grouped['spectra']):.1e}.")


if __name__ == "__main__":
    main()
