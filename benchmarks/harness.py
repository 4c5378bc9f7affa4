"""lllm against a faithful re-implementation of the reference method (benchmarks/reference.py), side by side.

    python benchmarks/harness.py [--quick] [--cases a,b,c,d] [--model smollm2-135m] [--out benchmarks]
                                 [--reps-a 3] [--reps 3] [--time-cap 7200] [--tokens-d 8,16,...]
                                 [--chunks-c default,8,64] [--device cpu]

Cases, each a section of RESULTS.md in --out (a run replaces only the sections of the cases it
runs, so cases can be run one at a time), case d also writes time_vs_tokens.png:

a. the full per-prompt analysis data (`lllm.analyses.pipeline.analyze`) against the reference's one
   `jacobian(vectorize=True)` call per figure and full SVDs, on the paper's 7-token prompt, with
   the agreement of every Jacobian, spectrum and stable rank;
b. top-k singular triplets of the token-combined J⁺ at T tokens: matrix-free (`lllm.kernel.matfree`)
   against the full J then an SVD; per-token top-k of every J⁺ᵢ;
c. peak memory at T tokens of lllm's full J⁺ for several chunk sizes ("default": the adaptive
   `default_chunk_size`, what a user gets), and of the matrix-free top-k;
d. time against T: reference full J, lllm's chunked reverse-mode J⁺, matrix-free top-k.

Protocol. In-process timing (case a; case d below `subprocess_from` tokens): the model is loaded
once and the methods run alternately, `reps` times each; medians. Fresh subprocesses (peak memory
of case a; all of cases b and c; case d from `subprocess_from` tokens, where one run takes
minutes): one run per method, alternating, each reporting its time (model load excluded) and its
resident set sampled every 10 ms, and its lifetime ru_maxrss. This process polls every child too
and kills it (by pid) past a memory or time cap: that is how a method is found not to fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lllm  # noqa: E402
from benchmarks.matfree_t256 import TEXT  # noqa: E402
from benchmarks.reference import COMPONENTS, full_jacobian, reference_analysis  # noqa: E402
from lllm.analyses.pipeline import analyze  # noqa: E402
from lllm.kernel.jacobian import default_chunk_size, embed, estimate_jacobian_bytes  # noqa: E402
from lllm.kernel.layers import cumulative_jacobians, layerwise_jacobians  # noqa: E402
from lllm.kernel.matfree import DetachedOperator, all_token_topk, topk_svd  # noqa: E402

PROMPT = "The bridge out of Marin is the"  # the paper's prompt: 7 SmolLM2 tokens
RESULT_MARK = "HARNESS-RESULT "  # prefix of the worker's JSON line on stdout
OUT_OF_MEMORY = ("can't allocate memory", "MemoryBudgetError", "MemoryError", "OutOfMemoryError")  # in a worker's last stderr line
GIB = 2**30


@dataclass(frozen=True)
class Config:
    """What the harness runs; FULL is the real benchmark, QUICK a smoke configuration."""

    reps_a: int  # in-process repetitions of case a
    reps: int  # in-process repetitions of case d below `subprocess_from`
    tokens_b: int
    tokens_c: int
    chunks_c: tuple[int | None, ...]  # None: lllm's default (adaptive) chunk size
    tokens_d: tuple[int, ...]
    subprocess_from: int  # T from which case d is timed by one fresh-subprocess run per method
    chunk_size: int | None = None  # lllm's full J⁺ in cases b and d; None: its default (adaptive)
    k: int = 8
    topk_options: dict = field(default_factory=lambda: {"block_size": 4, "power_iters": 8})
    time_cap: float = 7200.0  # seconds one subprocess may take, model load included
    memory_cap: float = 0.7  # of the memory available when a subprocess starts
    device: str = "cpu"  # where the model and every buffer live ("cuda": benchmarks/gpu_check.sh)


FULL = Config(reps_a=3, reps=3, tokens_b=256, tokens_c=512, chunks_c=(None, 8, 64),
              tokens_d=(8, 16, 32, 64, 128, 256, 512), subprocess_from=128)
QUICK = Config(reps_a=1, reps=1, tokens_b=16, tokens_c=16, chunks_c=(4, 16), tokens_d=(8, 16), subprocess_from=16,
               chunk_size=16, k=4, topk_options={"block_size": 4, "power_iters": 4}, time_cap=600.0)


# ---------------------------------------------------------------------------------------------
# Models and prompts
# ---------------------------------------------------------------------------------------------


# "shape-smollm2-135m": SmolLM2-135M's Llama config (as lllm.load builds it) with random weights, for a machine
# without the embedded weights (the GPU check): the same shapes, hence the same operations for the full J⁺ and
# the reference (the matrix-free top-k iterates, and its iterations depend on the weights' spectrum).
SHAPES = {
    "smollm2-135m": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)),
}


def load_model(name: str, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) in float32 on `device`: an lllm.load name, "shape-<name>" (SHAPES: random weights) or
    "tiny-<family>" (tests/tiny.py) for smoke runs."""
    if name.startswith(("tiny-", "shape-")):
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import IdsTokenizer
        from lllm.apps.zoo import tiny_model

        if name.startswith("shape-") and name.removeprefix("shape-") not in SHAPES:
            raise SystemExit(f"harness: no shape {name!r}; known: {', '.join('shape-' + n for n in SHAPES)}")
        family, overrides = SHAPES[name.removeprefix("shape-")] if name.startswith("shape-") else (name[5:], {})
        return tiny_model(family, torch.float32, **overrides).to(device), IdsTokenizer()
    return lllm.load(name, dtype=torch.float32, device=device)


def prompt_ids(model: torch.nn.Module, tokenizer, name: str, n_tokens: int | None) -> list[int]:
    """The paper's prompt (n_tokens None), else the first n_tokens of the prose TEXT, repeated past its end."""
    if name.startswith(("tiny-", "shape-")):  # IdsTokenizer has no text: fixed ids spread over the vocabulary
        return [(3 + 7 * i) % model.config.vocab_size for i in range(7 if n_tokens is None else n_tokens)]
    if n_tokens is None:
        return tokenizer(PROMPT)["input_ids"]
    ids = tokenizer(TEXT)["input_ids"]
    return (ids * math.ceil(n_tokens / len(ids)))[:n_tokens]


# ---------------------------------------------------------------------------------------------
# The methods compared: (model, tokenizer, ids, **options) -> result (a dict is reported by workers)
# ---------------------------------------------------------------------------------------------


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timing includes it (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable, *args, **kwargs):
    """(seconds, result) of one call."""
    _synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    _synchronize()
    return time.perf_counter() - start, result


def lllm_analysis(model, tokenizer, ids, ordinary: bool = False):
    """lllm's per-prompt analysis; with ordinary=True also the full ordinary J (not just its JVP)."""
    analysis = analyze(model, tokenizer, ids, progress=False)
    return analysis, (lllm.ordinary_jacobian(model, tokenizer, ids, progress=False) if ordinary else None)


def reference_full(model, tokenizer, ids) -> torch.Tensor:
    """The reference's J⁺: one vectorized `jacobian` call, (d, T, d)."""
    return full_jacobian(model, embed(model, ids))


def lllm_full(model, tokenizer, ids, chunk_size: int | None = None) -> torch.Tensor:
    """lllm's J⁺ by chunked batched reverse mode, (d, T, d)."""
    return lllm.detached_jacobian(model, tokenizer, ids, chunk_size=chunk_size, progress=False).jacobian


def full_then_svds(model, tokenizer, ids, source: str, chunk_size: int | None = None, k: int | None = None) -> dict:
    """A full J⁺ (source "reference" or "lllm"), then with k the top-k σ of the combined matrix and of every block.

    The SVDs are full thin SVDs (U, S and Vh), as the reference computes them. Returns the seconds of
    each phase and the singular values.
    """
    out: dict = {"phases": {}}
    if source == "reference":
        seconds, jac = timed(reference_full, model, tokenizer, ids)
    else:
        out["chunk_size"] = chunk_size or default_chunk_size(model, len(ids), model.dtype)  # what lllm will take
        seconds, jac = timed(lllm_full, model, tokenizer, ids, chunk_size)
    out["phases"]["jacobian"] = seconds
    if k is not None:
        seconds, svd = timed(torch.linalg.svd, jac.reshape(jac.shape[0], -1), full_matrices=False)
        out["phases"]["svd of the combined J"], out["sigma"] = seconds, svd.S[:k].tolist()
        seconds, svd = timed(torch.linalg.svd, jac.permute(1, 0, 2), full_matrices=False)
        out["phases"]["svds of every block"], out["token_sigma"] = seconds, svd.S[:, :k].tolist()
    return out


def matfree_topk(model, tokenizer, ids, k: int, **options) -> dict:
    """Top-k σ of the combined J⁺ by lllm.kernel.matfree (operator opening included), never forming J."""
    with DetachedOperator(model, embed(model, ids)) as op:
        return {"sigma": topk_svd(op, k, **options)[1].tolist()}


def matfree_tokens(model, tokenizer, ids, k: int) -> dict:
    """Top-k σ of every J⁺ᵢ by lllm.kernel.matfree.all_token_topk (auto strategy, memory-bounded)."""
    with DetachedOperator(model, embed(model, ids)) as op:
        spectra = all_token_topk(op, k, progress=False)
        return {"token_sigma": spectra.S.tolist(), "strategy": spectra.strategy}


METHODS: dict[str, Callable] = {
    "lllm_analysis": lllm_analysis, "reference_analysis": reference_analysis, "reference_full": reference_full,
    "lllm_full": lllm_full, "full_then_svds": full_then_svds, "matfree_topk": matfree_topk,
    "matfree_tokens": matfree_tokens,
}


# ---------------------------------------------------------------------------------------------
# Fresh subprocesses with a watchdog
# ---------------------------------------------------------------------------------------------


def peak_rss_during(fn: Callable) -> tuple[dict, object]:
    """(figures, result) of fn() while a thread samples this process's RSS every 10 ms: seconds, RSS before, peak RSS."""
    process, done = psutil.Process(), threading.Event()
    figures = {"baseline_rss": process.memory_info().rss}
    peak = [figures["baseline_rss"]]

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    figures["seconds"], result = timed(fn)
    done.set()
    sampler.join()
    figures["peak_rss"] = max(peak[0], process.memory_info().rss)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        figures["cuda_peak"] = torch.cuda.max_memory_allocated()  # the GPU's own peak: RSS is host memory only
    return figures, result


def worker(job: dict) -> None:
    """Run one job in this (fresh) process; print its figures (and a dict result) as one JSON line."""
    model, tokenizer = load_model(job["model"], job.get("device", "cpu"))
    ids = prompt_ids(model, tokenizer, job["model"], job["tokens"])
    figures, result = peak_rss_during(lambda: METHODS[job["method"]](model, tokenizer, ids, **job["options"]))
    figures["lifetime_max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    figures["values"] = result if isinstance(result, dict) else {}
    print(RESULT_MARK + json.dumps(figures), flush=True)


def in_subprocess(job: dict, config: Config) -> dict:
    """Run a worker job in a fresh process, killed past the memory or time cap: its figures, or why it failed."""
    cap = int(config.memory_cap * psutil.virtual_memory().available)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(job)], stdout=out, stderr=err,
                                 cwd=ROOT)
        watched, start, seen, failure = psutil.Process(child.pid), time.monotonic(), 0, None
        while child.poll() is None:
            try:
                seen = max(seen, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            if seen > cap or time.monotonic() - start > config.time_cap:
                failure = (f"killed at {seen / GIB:.1f} GiB RSS (cap {cap / GIB:.1f} GiB)" if seen > cap
                           else f"killed after {config.time_cap:.0f} s (time cap)")
                child.kill()
                child.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith(RESULT_MARK)]
        if failure is None and (child.returncode != 0 or not lines):
            last = (err.read().strip().splitlines() or ["(no output)"])[-1]
            if not any(sign in last for sign in OUT_OF_MEMORY):  # a bug, not a measurement
                raise RuntimeError(f"worker {job} failed with exit code {child.returncode}: {last}")
            failure = f"out of memory: {last}"
    if failure is not None:
        return {"failed": failure, "cap": cap}
    return {**json.loads(lines[-1].removeprefix(RESULT_MARK)), "cap": cap}


class Bench:
    """The model loaded once in this process, and memoized fresh-subprocess measurements."""

    def __init__(self, name: str, config: Config):
        self.name, self.config = name, config
        self.model, self.tokenizer = load_model(name, config.device)
        self.measured: dict[str, dict] = {}

    def ids(self, n_tokens: int | None) -> list[int]:
        return prompt_ids(self.model, self.tokenizer, self.name, n_tokens)

    def run(self, method: str, n_tokens: int | None, **options):
        """(seconds, result) of one in-process run."""
        return timed(METHODS[method], self.model, self.tokenizer, self.ids(n_tokens), **options)

    def fresh(self, method: str, n_tokens: int | None, **options) -> dict:
        """One run in a fresh subprocess, shared by every case that asks for the same job: figures, or "failed"."""
        job = {"model": self.name, "device": self.config.device, "method": method, "tokens": n_tokens,
               "options": {k: v for k, v in options.items() if v is not None}}
        key = json.dumps(job, sort_keys=True)
        if key not in self.measured:
            self.measured[key] = in_subprocess(job, self.config)
            print(f"  fresh {method} T={n_tokens} {job['options']}: {_memory_text(self.measured[key])}", flush=True)
        return self.measured[key]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def sigma_error(sigma, exact) -> float:
    """max |σ − σ_exact| / σ_exact over all values (lists or tensors of the same shape)."""
    sigma, exact = torch.tensor(sigma, dtype=torch.float64), torch.tensor(exact, dtype=torch.float64)
    return float(((sigma - exact) / exact).abs().max())


def _memory_text(m: dict) -> str:
    if "failed" in m:
        return "failed: " + m["failed"]
    return (f"{m['seconds']:.1f} s, peak RSS {m['peak_rss'] / GIB:.2f} GiB "
            f"(+{(m['peak_rss'] - m['baseline_rss']) / GIB:.2f} over the loaded model)"
            + (f", GPU peak {m['cuda_peak'] / GIB:.2f} GiB" if "cuda_peak" in m else ""))


def _gib(m: dict, key: str = "peak_rss") -> str:
    return "—" if "failed" in m else f"{m[key] / GIB:.2f}"


def _increase(m: dict) -> str:
    return "—" if "failed" in m else f"{(m['peak_rss'] - m['baseline_rss']) / GIB:.2f}"


def _chunk_text(chunk_size: int | None, m: dict) -> str:
    """How lllm's full J⁺ was chunked in a fresh run: the size asked for, or the default and what it chose."""
    if chunk_size:
        return f"chunk_size={chunk_size}"
    return f"default options: chunk_size={m.get('values', {}).get('chunk_size', '?')}, adaptive"


def _phase(m: dict, *names: str) -> float | None:
    """Sum of a fresh run's phase seconds (None if it failed)."""
    return None if "failed" in m else sum(m["values"]["phases"][n] for n in names)


def _secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _times(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.1f}×"


# ---------------------------------------------------------------------------------------------
# The cases. Each returns its markdown section.
# ---------------------------------------------------------------------------------------------


def case_a(bench: Bench) -> str:
    """Per-prompt analysis at the paper's prompt: alternating in-process timing, fresh-process memory, agreement."""
    reps = bench.config.reps_a
    samples: dict[str, list[float]] = {"lllm": [], "reference": [], "lllm + ordinary J": []}
    lllm_parts, ref_parts = [], []
    for _ in range(reps):
        secs, (analysis, _) = bench.run("lllm_analysis", None)
        samples["lllm"].append(secs)
        lllm_parts.append(analysis.meta["timings"])
        secs, ref = bench.run("reference_analysis", None)
        samples["reference"].append(secs)
        ref_parts.append(ref.timings)
        secs, (analysis, ordinary) = bench.run("lllm_analysis", None, ordinary=True)
        samples["lllm + ordinary J"].append(secs)
    agreement = _agreement_a(bench, analysis, ordinary, ref)
    del analysis, ordinary, ref
    memory = {"lllm": bench.fresh("lllm_analysis", None), "reference": bench.fresh("reference_analysis", None),
              "lllm + ordinary J": bench.fresh("lllm_analysis", None, ordinary=True)}
    ref_time = statistics.median(samples["reference"])
    rows = [f"| {name} | {statistics.median(s):.1f} | {min(s):.1f}–{max(s):.1f} | "
            f"{ref_time / statistics.median(s):.1f}× | {_gib(memory[name])} | {_gib(memory[name], 'lifetime_max_rss')} |"
            for name, s in samples.items()]
    ids = bench.ids(None)
    parts = lambda runs: ", ".join(f"{k} {statistics.median([r[k] for r in runs]):.1f}" for k in runs[0])  # noqa: E731
    worst = max(v for k, v in agreement.items() if k.startswith(("J", "stable")))
    return "\n".join([
        f"## (a) Per-prompt analysis data, T = {len(ids)} ({bench.tokenizer.decode(ids)!r})",
        "",
        f"Median of {reps} alternating in-process runs (lllm, reference, lllm + ordinary J). **lllm** = "
        "`lllm.analyses.pipeline.analyze`: final J⁺ (chunked reverse mode), the ordinary J's reconstruction Σ Jᵢxᵢ "
        "for Fig 3 from **one JVP** (lllm does not form the ordinary J), cumulative and layer-wise J⁺ of every "
        "layer for layer/attn/MLP from one recorded forward (`layer_jacobians`: a forward sweep and batched VJPs "
        "of the replay, each MLP composed into one matrix per token), per-token SVDs, the stable rank of every "
        "layer map (‖J‖²_F over a Rayleigh quotient for σ²_max), the spectra and top vectors of the cumulative "
        "layer output (the ones Fig 6A, 6B and Tables 1–3 read; no figure draws another layer spectrum), plus "
        "the decodings and row/column features that the reference side does not compute; while it runs, freed "
        "tensor memory stays in the process heap (`lllm.kernel.heap.retained_heap`, glibc), where the reference "
        "runs on the allocator's defaults. **lllm + ordinary J** "
        "adds a full `lllm.ordinary_jacobian`, so that both sides materialize the same Jacobians. "
        "**reference** = `benchmarks/reference.py`: one `jacobian(vectorize=True)` per figure (final J⁺, "
        "ordinary J, one per layer for the cumulative and one per layer for the layer-wise Jacobians, each "
        "returning layer/attn/MLP at once), thin `torch.linalg.svd` of every block and every layer's "
        "combined matrix. Peak RSS: one more run of each in a fresh subprocess.",
        "",
        "| method | median s | range s | reference ÷ method | peak RSS GiB (computation) | peak RSS GiB (process lifetime, load included) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Where the time goes (medians, s). lllm: {parts(lllm_parts)}. Reference: {parts(ref_parts)}.",
        "",
        "Agreement, lllm against the reference (Jacobians: ‖Δ‖_F/‖ref‖_F, worst over layers; spectra: "
        "max |Δσ|/σ_max; stable ranks: max relative difference):",
        "",
        "| quantity | worst relative difference |",
        "|---|---|",
        *[f"| {k} | {v:.2e} |" for k, v in agreement.items()],
        "",
        f"Worst Jacobian / stable-rank difference {worst:.2e}: {'within' if worst <= 1e-5 else 'OUTSIDE'} "
        "the 1e-5 float32 criterion.",
    ])


def _agreement_a(bench: Bench, analysis, ordinary, ref) -> dict[str, float]:
    """Every Jacobian, spectrum and stable rank of lllm against the reference's."""
    model, tok, ids = bench.model, bench.tokenizer, bench.ids(None)
    cumulative = cumulative_jacobians(model, tok, ids, progress=False)  # what analyze computed, kept this time
    layerwise = layerwise_jacobians(model, tok, ids, progress=False)
    per_layer = lambda a, b: max(relative(x, y) for x, y in zip(a, b))  # noqa: E731
    spectra = lambda a, b: float(((a.double() - b.double()).abs().amax(-1) / b.double().amax(-1)).max())  # noqa: E731
    out = {"J⁺ final": relative(analysis.final.jacobian, ref.final),
           "J ordinary (lllm.ordinary_jacobian)": relative(ordinary.jacobian, ref.ordinary),
           "Σ Jᵢxᵢ ordinary (lllm: one JVP; reference: J·x)": relative(
               analysis.ordinary_reconstruction, torch.einsum("otd,td->o", ref.ordinary, ref.inputs))}
    for c in COMPONENTS:
        out[f"J⁺ cumulative {c}"] = per_layer(cumulative.jacobian[c], ref.cumulative[c])
        out[f"J⁺ layer-wise {c}"] = per_layer(layerwise.jacobian[c], ref.layerwise[c])
    out["spectra per token"] = spectra(analysis.token_spectra, ref.token_spectra)
    out["spectra cumulative layer"] = spectra(analysis.layer_spectra["layer"], ref.layer_spectra["layer"])
    for kind in ("cumulative", "layerwise"):
        mine, theirs = analysis.stable_ranks(kind), ref.stable_ranks(kind)
        out[f"stable ranks {kind}"] = max(abs(a - b) / b for c in COMPONENTS for a, b in zip(mine[c], theirs[c]))
    return out


def case_b(bench: Bench) -> str:
    """Top-k of the combined J⁺ and of every J⁺ᵢ at tokens_b: matrix-free against full J + SVDs, fresh processes."""
    cfg, T = bench.config, bench.config.tokens_b
    k, opts, d = cfg.k, cfg.topk_options, bench.model.config.hidden_size
    topk = bench.fresh("matfree_topk", T, k=k, **opts)
    tokens = bench.fresh("matfree_tokens", T, k=k)
    ref = bench.fresh("full_then_svds", T, source="reference", k=k)
    full = bench.fresh("full_then_svds", T, source="lllm", chunk_size=cfg.chunk_size, k=k)
    exact = full if "failed" in ref else ref
    combined = ("svd of the combined J",)
    blocks = ("svds of every block",)
    rows = [("combined top-k", topk, _phase(ref, "jacobian", *combined), _phase(full, "jacobian", *combined)),
            ("per-token top-k", tokens, _phase(ref, "jacobian", *blocks), _phase(full, "jacobian", *blocks))]
    topk_error = sigma_error(topk["values"]["sigma"], exact["values"]["sigma"])
    token_error = sigma_error(tokens["values"]["token_sigma"], exact["values"]["token_sigma"])
    lines = [
        f"## (b) Top-{k} singular triplets at T = {T}",
        "",
        f"The combined J⁺ is {d} × {T * d}. **matfree**: `DetachedOperator` + `topk_svd(k={k}, "
        f"{', '.join(f'{a}={v}' for a, v in opts.items())})`, a seeded block-Krylov randomized SVD (opening the "
        f"operator included); per-token: `all_token_topk(k={k})` (auto strategy, memory-bounded; it chose "
        f"{tokens['values']['strategy']!r}). **Full J + SVD**: the reference's `jacobian(vectorize=True)`, or "
        f"lllm's chunked reverse mode ({_chunk_text(cfg.chunk_size, full)}), then full thin SVDs of the combined matrix "
        "and of every block. One fresh subprocess per method, alternating; seconds exclude the model load.",
        "",
        "| task | matfree s | reference J + SVD s | lllm J + SVD s | matfree vs reference | matfree vs lllm J |",
        "|---|---|---|---|---|---|",
        *[f"| {task} | {m['seconds']:.1f} | {_secs(r)} | {_secs(f)} | {_times(r, m['seconds'])} | "
          f"{_times(f, m['seconds'])} |" for task, m, r, f in rows],
        "",
        "| fresh run | peak RSS GiB | over the loaded model GiB | phases (s) |",
        "|---|---|---|---|",
        *[f"| {name} | {_gib(m)} | {_increase(m)} | "
          + (m["failed"] if "failed" in m else "; ".join(
              f"{p} {s:.1f}" for p, s in m["values"].get("phases", {"total": m["seconds"]}).items())) + " |"
          for name, m in (("matfree top-k", topk), ("matfree per-token top-k", tokens),
                          ("reference J + SVDs", ref), ("lllm J + SVDs", full))],
        "",
        f"Agreement, against the full {'lllm' if exact is full else 'reference'} J's SVD: top-{k} σ of the combined "
        f"J⁺, max relative error {topk_error:.2e} ({'within' if topk_error <= 1e-4 else 'OUTSIDE'} the 1e-4 "
        f"criterion); top-{k} σ of all {T} blocks, max relative error {token_error:.2e}.",
    ]
    if "failed" not in ref and "failed" not in full:
        lines.append(f"The reference and lllm full J agree on the combined top-{k} σ to "
                     f"{sigma_error(full['values']['sigma'], ref['values']['sigma']):.2e}.")
    if "failed" in ref:
        lines.append(f"The reference's full J did not fit ({ref['failed']}); lllm's chunked J is the baseline.")
    return "\n".join(lines)


def case_c(bench: Bench) -> str:
    """Peak memory at tokens_c: full J⁺ per chunk size, and the matrix-free top-k, each in a fresh process."""
    cfg, T = bench.config, bench.config.tokens_c
    d = bench.model.config.hidden_size
    rows = []
    for chunk in cfg.chunks_c:
        m = bench.fresh("full_then_svds", T, source="lllm", chunk_size=chunk)
        taken = chunk or m.get("values", {}).get("chunk_size")  # the default, as the worker chose it
        estimate = "—" if taken is None else f"{estimate_jacobian_bytes(bench.model, T, taken, torch.float32) / GIB:.2f}"
        label = f"chunk_size={chunk}" if chunk else f"default options (it chose chunk_size={taken})"
        rows.append(f"| full J⁺, {label} | {_gib(m)} | {_increase(m)} | {estimate} | "
                    f"{_secs(_phase(m, 'jacobian')) if 'failed' not in m else m['failed']} |")
    m = bench.fresh("matfree_topk", T, k=cfg.k, **cfg.topk_options)
    rows.append(f"| matrix-free top-{cfg.k} | {_gib(m)} | {_increase(m)} | — | "
                f"{m['failed'] if 'failed' in m else round(m['seconds'], 1)} |")
    return "\n".join([
        f"## (c) Peak memory at T = {T}",
        "",
        f"One fresh subprocess per row (seconds exclude the model load). J⁺ itself is {d * T * d * 4 / GIB:.2f} GiB "
        "in float32. \"Estimate\" is `lllm.kernel.jacobian.estimate_jacobian_bytes`, the conservative bound that "
        "`check_fits` refuses against.",
        "",
        "| what | peak RSS GiB | over the loaded model GiB | estimate GiB | seconds |",
        "|---|---|---|---|---|",
        *rows,
    ])


def case_d(bench: Bench, out: Path) -> str:
    """Time against T: reference full J, lllm's reverse full J⁺, matrix-free top-k; the log-log plot."""
    cfg = bench.config
    names = ("reference full J (vectorized)", "lllm full J⁺ (chunked reverse)", f"lllm matrix-free top-{cfg.k}")
    times: dict[str, dict[int, float]] = {n: {} for n in names}
    peaks: dict[str, dict[int, str]] = {n: {} for n in names}
    sources, reference_failed = {}, None
    for T in cfg.tokens_d:
        svd_k = cfg.k if T == cfg.tokens_b else None  # shares case b's runs
        if T >= cfg.subprocess_from:
            sources[T] = "1 fresh subprocess each"
            runs = {names[1]: bench.fresh("full_then_svds", T, source="lllm", chunk_size=cfg.chunk_size, k=svd_k),
                    names[2]: bench.fresh("matfree_topk", T, k=cfg.k, **cfg.topk_options)}
            if reference_failed is None:
                runs[names[0]] = bench.fresh("full_then_svds", T, source="reference", k=svd_k)
                if "failed" in runs[names[0]]:
                    reference_failed = f"T = {T} ({runs[names[0]]['failed']})"
            for name, m in runs.items():
                if "failed" not in m:
                    times[name][T] = _phase(m, "jacobian") if name != names[2] else m["seconds"]
                peaks[name][T] = _gib(m)
        else:
            sources[T] = f"median of {cfg.reps} in-process"
            methods = {names[0]: ("reference_full", {}), names[1]: ("lllm_full", {"chunk_size": cfg.chunk_size}),
                       names[2]: ("matfree_topk", {"k": cfg.k, **cfg.topk_options})}
            samples: dict[str, list[float]] = {n: [] for n in methods}
            for _ in range(cfg.reps):
                for name, (method, opts) in methods.items():
                    samples[name].append(bench.run(method, T, **opts)[0])
            for name in methods:
                times[name][T] = statistics.median(samples[name])
        print(f"  T={T}: " + ", ".join(f"{n} {times[n].get(T, float('nan')):.2f}" for n in names), flush=True)
    _plot(times, out / "time_vs_tokens.png", bench)
    cell = lambda n, T: (_secs(times[n].get(T)) + (f" ({peaks[n][T]} GiB)" if T in peaks[n] else ""))  # noqa: E731
    return "\n".join([
        "## (d) Time against the number of tokens",
        "",
        "Seconds per call with the model loaded (and, for fresh-subprocess points, the peak RSS in GiB). "
        "`time_vs_tokens.png` plots them log-log."
        + (f" The reference was not run past {reference_failed}." if reference_failed else ""),
        "",
        "| T | timing | " + " | ".join(names) + " | reference ÷ lllm full | lllm full ÷ matrix-free |",
        "|---" * (len(names) + 4) + "|",
        *[f"| {T} | {sources[T]} | " + " | ".join(cell(n, T) for n in names)
          + f" | {_times(times[names[0]].get(T), times[names[1]].get(T))}"
          + f" | {_times(times[names[1]].get(T), times[names[2]].get(T))} |" for T in cfg.tokens_d],
    ])


def _plot(times: dict[str, dict[int, float]], path: Path, bench: Bench) -> None:
    """Log-log seconds against T, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (name, points), marker in zip(times.items(), "os^"):
        ax.plot(list(points), list(points.values()), marker=marker, label=name)
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens T", ylabel="seconds",
           title=f"{bench.name}, float32, {torch.get_num_threads()} torch threads")
    ax.set_xticks(list(bench.config.tokens_d), [str(T) for T in bench.config.tokens_d])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine() -> list[tuple[str, str]]:
    """CPU, cores, memory, versions, threads: the machine description of RESULTS.md."""
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return [("CPU", cpu), ("cores (logical / physical)", f"{os.cpu_count()} / {psutil.cpu_count(logical=False)}"),
            ("memory", f"{psutil.virtual_memory().total / GIB:.1f} GiB"), ("python", platform.python_version()),
            ("torch", torch.__version__), ("transformers", transformers.__version__),
            ("torch threads", str(torch.get_num_threads()))]


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def write_results(path: Path, header: str, sections: dict[str, str]) -> None:
    """RESULTS.md: the header, then one section per case; sections of cases not run this time are kept."""
    marker = re.compile(r"^<!-- case ([a-d]) -->$", re.M)
    kept = {}
    if path.exists():
        text = path.read_text()
        starts = list(marker.finditer(text))
        for i, m in enumerate(starts):
            kept[m.group(1)] = text[m.end(): starts[i + 1].start() if i + 1 < len(starts) else len(text)].strip()
    kept.update(sections)
    path.write_text(header + "".join(f"\n<!-- case {c} -->\n{kept[c]}\n" for c in sorted(kept)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke configuration")
    parser.add_argument("--cases", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--model", default="smollm2-135m",
                        help="an lllm.load name, shape-<name> (random weights of its shape) or tiny-<family>")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="directory for RESULTS.md and the plot")
    parser.add_argument("--reps-a", type=int, help="in-process repetitions of case a (default 3; quick 1)")
    parser.add_argument("--reps", type=int, help="in-process repetitions of case d's short prompts (default 3)")
    parser.add_argument("--time-cap", type=float, help="seconds a fresh subprocess may take (default 7200)")
    parser.add_argument("--tokens-d", help="comma-separated prompt lengths of case d (default 8,16,…,512)")
    parser.add_argument("--chunks-c", help="comma-separated chunk sizes of case c, 'default' for lllm's own "
                        "(default: default,8,64)")
    parser.add_argument("--device", help="where the model runs: cpu (default) or cuda")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - set("abcd"):
        parser.error(f"--cases must be a comma-separated subset of a,b,c,d, got {args.cases!r}")
    overrides = {"reps_a": args.reps_a, "reps": args.reps, "time_cap": args.time_cap,
                 "tokens_d": args.tokens_d and tuple(int(t) for t in args.tokens_d.split(",")),
                 "chunks_c": args.chunks_c and tuple(None if c == "default" else int(c) for c in args.chunks_c.split(",")),
                 "device": args.device}
    config = dataclasses.replace(QUICK if args.quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.model, config)
    command = "python benchmarks/harness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = {}
    for case in cases:
        started, load_start, clock = datetime.datetime.now().astimezone(), load_average(), time.perf_counter()
        print(f"case {case}", flush=True)
        body = case_d(bench, args.out) if case == "d" else globals()[f"case_{case}"](bench)
        sections[case] = body + (
            f"\n\n*Run {started.isoformat(timespec='minutes')}, `{command}`, {args.model} float32 on {config.device} "
            f"({dict(machine())['CPU']}), "
            f"{(time.perf_counter() - clock) / 60:.1f} min; load average (1/5/15 min) {load_start} at the start of "
            f"the case, {load_average()} at its end; {psutil.virtual_memory().available / GIB:.1f} GiB available at "
            "the end.*")
    header = "\n".join([
        "# lllm against the reference method",
        "",
        "Written by `benchmarks/harness.py` (do not edit by hand); each case's section says when, how and on "
        "which CPU it ran (a footer that names none: an AMD EPYC, where every case ran before 2026-12-04); the "
        "table below is the machine of the latest run. The machine is shared with other jobs: the load averages "
        "are what the timings ran under, and the ratios (methods alternating under the same load) say more than "
        "the absolute seconds.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine()],
        "",
    ])
    if config.device.startswith("cuda"):  # one more row of the machine table
        header = header.rstrip("\n") + f"\n| GPU | {torch.cuda.get_device_name(config.device)} |\n"
    write_results(args.out / "RESULTS.md", header, sections)
    print(f"wrote {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
