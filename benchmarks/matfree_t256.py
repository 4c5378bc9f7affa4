"""Matrix-free top-k SVD against the full J⁺ on a long SmolLM2 prompt: wall time and peak RSS per phase.

    python benchmarks/matfree_t256.py [--tokens 256] [--k 8] [--no-full]

Phases: opening the operator (forward, graphs, reconstruction check); top-k of the combined matrix
with the default HMT block and with a small block and more iterations; per-token top-k for every
token; the full J⁺ by `lllm.detached_jacobian` (skipped with --no-full, or estimated when it would
not fit). Prints one JSON object; `measure` returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import psutil
import torch

import lllm
from lllm.errors import MemoryBudgetError
from lllm.kernel.jacobian import estimate_jacobian_bytes
from lllm.kernel.matfree import DetachedOperator, all_token_topk, topk_svd

# Plain prose, long enough for 256 SmolLM2 tokens (it has about 300); it ends with the paper's prompt.
TEXT = (
    "The Golden Gate Bridge spans the strait between San Francisco Bay and the Pacific Ocean. When it opened "
    "in 1937 it was the longest suspension bridge in the world, and its towers, painted in a colour called "
    "international orange, rise more than two hundred metres above the water. Fog often rolls in from the ocean "
    "in the afternoon and hides the roadway, so that only the tops of the towers can be seen from the city. "
    "Engineers had argued for years that a bridge could not be built there: the currents were too strong, the "
    "water was too deep, and the winds that came through the strait would tear any deck apart. The chief "
    "engineer answered with a design that let the deck move, swinging several metres from side to side in a "
    "storm, and with a safety net slung under the work that saved the lives of many men who fell. Today more "
    "than a hundred thousand cars cross it every day, and people walk and ride bicycles along its sidewalks to "
    "look back at the city and out at the islands in the bay. Ships pass beneath it on their way to the ports of "
    "Oakland and San Francisco, and sea lions rest on the rocks near its southern tower. Painters work on it all "
    "year round, because the salt air eats at the steel, and by the time they reach one end it is nearly time "
    "to start again at the other. On the northern side the road climbs into the hills of Marin County, through "
    "a tunnel painted with a rainbow, toward the redwood forests and the small towns along the coast. The "
    "bridge out of Marin is the"
)


class PeakRSS:
    """Context manager: wall seconds and the peak resident set size (bytes) sampled every 10 ms, so far."""

    def __enter__(self) -> PeakRSS:
        self._process = psutil.Process()
        self.start_rss = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0, self._t1 = time.perf_counter(), None
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._t1 = time.perf_counter()
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    def summary(self) -> dict:
        """Seconds and peak RSS since entry (inside the block: until now)."""
        if self._t1 is None:
            self.peak = max(self.peak, self._process.memory_info().rss)
        seconds = (self._t1 or time.perf_counter()) - self._t0
        return {"seconds": round(seconds, 1), "peak_rss_gib": round(self.peak / 2**30, 2),
                "rss_increase_gib": round((self.peak - self.start_rss) / 2**30, 2)}


def _log(name: str, entry: dict) -> dict:
    """Print one finished phase to stderr (the run takes many minutes) and return it."""
    print(name, json.dumps(entry), file=sys.stderr, flush=True)
    return entry


def _errors(s: torch.Tensor, s_full: torch.Tensor) -> float:
    """max relative error of singular values s against the exact s_full."""
    return float(((s.double() - s_full) / s_full).abs().max())


def measure(model, tokenizer, n_tokens: int = 256, k: int = 8, full: bool = True) -> dict:
    """Run every phase on the first `n_tokens` tokens of TEXT; return times, RSS, products and errors."""
    ids = tokenizer(TEXT)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"TEXT has {len(ids)} tokens, fewer than {n_tokens}")
    ids = ids[:n_tokens]
    report: dict = {"model": getattr(model, "lllm_source", {}).get("name"), "tokens": n_tokens, "k": k,
                    "torch_threads": torch.get_num_threads(), "text": tokenizer.decode(ids)}
    settings = {"topk_default": {}, "topk_block4_iters8": {"block_size": 4, "power_iters": 8}}
    spectra = {}
    with PeakRSS() as phase, DetachedOperator.from_prompt(model, tokenizer, ids) as op:
        report["open"] = _log("open", {**phase.summary(), "relative_error": op.relative_error,
                                       "chunk_size": op.chunk_size})
        for name, options in settings.items():
            with PeakRSS() as phase:
                _, spectra[name], _ = topk_svd(op, k, **options)
            report[name] = _log(name, {**phase.summary(), "options": options, "products": vars(op.counts).copy()})
            op.counts.jvp = op.counts.vjp = 0
        with PeakRSS() as phase:
            per_token = all_token_topk(op, k, progress=False)
        report["all_token_topk"] = _log("all_token_topk", {**phase.summary(), "strategy": per_token.strategy,
                                                           "products": vars(per_token.products)})
    d = model.config.hidden_size
    report["full_jacobian_estimate_gib"] = round(estimate_jacobian_bytes(model, n_tokens, 64, torch.float32) / 2**30, 2)
    if full:
        try:
            with PeakRSS() as phase:
                result = lllm.detached_jacobian(model, tokenizer, ids, progress=False)
            report["full_jacobian"] = _log("full_jacobian", {**phase.summary(), "products": {"jvp": 0, "vjp": d}})
            s_full = torch.linalg.svdvals(result.combined.double())[:k]
            for name in settings:
                report[name]["max_relative_sigma_error"] = _errors(spectra[name], s_full)
                report[name]["speedup_vs_full"] = round(report["full_jacobian"]["seconds"] / report[name]["seconds"], 1)
            per_block = torch.linalg.svdvals(result.jacobian.permute(1, 0, 2).double())[:, :k]
            report["all_token_topk"]["max_abs_sigma_error"] = float((per_token.S.double() - per_block).abs().max())
        except MemoryBudgetError as err:
            report["full_jacobian"] = {"skipped": str(err)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--no-full", action="store_true", help="skip the full J⁺ (the slowest phase)")
    args = parser.parse_args()
    model, tokenizer = lllm.load("smollm2-135m", torch.float32)
    print(json.dumps(measure(model, tokenizer, args.tokens, args.k, not args.no_full), indent=1))


if __name__ == "__main__":
    main()
