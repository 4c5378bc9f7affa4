"""`lllm sweep`: the per-prompt analysis over a prompt set, locally or on a Dask cluster ("At scale").

The paper ends: "it should be possible to scale this investigation to well-known LLM datasets".
`run_sweep` analyzes every prompt of a set with one model and writes one row per prompt: tokens,
top next tokens, the final J⁺'s reconstruction error, per-token stable ranks, the cumulative stable
rank of every layer/attention/MLP output, and the top left singular vectors of the last token's J⁺
decoded through lm_head.

Engines. "local" runs the prompts in this process with a tqdm bar. "dask" runs the same batch
function on Dask distributed workers (a LocalCluster of worker processes on loopback, or an existing
scheduler); each worker process loads the model once and keeps it (`_cached_model`, keyed by
loader, model and dtype). Dask rather than Ray: a pure-Python install a fraction of Ray's size, no
daemon to start or leave behind, and per-worker state is just module state in the worker process,
which is all a cached model needs. With threads=1 (the default) in the local engine and in every
worker, the same float operations run in the same order everywhere, so both engines give the same
rows bit for bit; more intra-op threads split reductions differently and change the last bits.

Nothing is lost. Finished rows are committed per batch as Parquet part files in `<out>.parts/`,
each written to a temporary file and renamed into place (a part is complete or absent). A run reads
the parts first and computes only the prompts that have none, so an interrupted sweep (Ctrl-C, a
killed worker or driver) is resumed by running the same command again; an exclusive lock on the
parts directory keeps two drivers from computing the same prompts. `<out>` is assembled from the
parts, atomically, once every prompt has a row. A prompt that raises records the error in its row
(the `error` column) and the sweep goes on; a batch lost to the machinery (a worker that keeps
dying) leaves its prompts missing for the next run and fails the run with `SweepIncompleteError`.

Cost, measured in CPU seconds on SmolLM2-135M (float32, one thread): the default is faithful, every
layer/attention/MLP output of all 30 layers, from one forward sweep of the replayed network (a
tangent at token i runs on tokens i…T-1 only, so the cost grows as T(T+1)/2): 46 s at T = 7 and
95 s at T = 11. `FAST` (the CLI's --fast) keeps the layer outputs of every third layer, by reverse
mode (d rows through ℓ+1 layers each, growing as T): 49 s at T = 7 and 70 s at T = 11, so it only
pays on longer prompts; the bundled 113 prompts took a median of 48 s each. `layers="none"` skips
the depth profile: the final J⁺ alone, about 1.2·T s a prompt.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import importlib
import importlib.resources
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from lllm.defaults import DEFAULT_MODEL, DTYPES
from lllm.analyses.decompose import decode_output, per_token_stable_rank, stable_rank, svd
from lllm.errors import OutputPathError, SweepError, SweepIncompleteError
from lllm.kernel.jacobian import check_fits, default_chunk_size, detached_jacobian, embed, tokenize
from lllm.analyses.generation import top_next_tokens
from lllm.kernel.layers import COMPONENTS, METHODS, cumulative_jacobians, final_from_cumulative
from lllm.io.files import replace_durably, write_bytes_atomically
from lllm.validation import check_choice, check_components, check_int, writable_file

log = logging.getLogger(__name__)

DEFAULT_LOADER = "lllm.io.models:load"
ENGINES = ("local", "dask")
# The stable rank by depth in about a third of the faithful time (see the module docstring).
FAST = {"layers": "every:3", "components": ("layer",), "method": "reverse"}

TIMING_COLUMNS = ("seconds", "cpu_seconds")  # the only columns that differ between runs of the same sweep
# One row per (model, prompt). Fixed, so that parts of successful and failed prompts concatenate.
SCHEMA = pa.schema([
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("dtype", pa.string()),
    ("prompt_index", pa.int64()),  # position in the prompt list of the run that assembled <out>
    ("prompt_id", pa.string()),  # sha256 of the prompt text, first 16 hex digits
    ("prompt", pa.string()),
    ("n_tokens", pa.int64()),
    ("token_ids", pa.list_(pa.int64())),
    ("tokens", pa.list_(pa.string())),
    ("next_token_ids", pa.list_(pa.int64())),  # top next tokens by the model's own logits, best first
    ("next_tokens", pa.list_(pa.string())),
    ("next_probs", pa.list_(pa.float64())),
    ("final_method", pa.string()),  # how the final J⁺ was computed: "reverse", or "forward" with the layers
    ("reconstruction_error", pa.float64()),  # std(y − Σ J⁺ᵢxᵢ − c)/std(y) of the final J⁺
    ("stable_rank", pa.float64()),  # of the token-combined final J⁺ (d, T·d)
    ("token_stable_ranks", pa.list_(pa.float64())),  # of every block J⁺ᵢ (d, d)
    ("layers", pa.list_(pa.int64())),  # the layers of the cumulative columns below ([] when skipped)
    ("cumulative_stable_rank_layer", pa.list_(pa.float64())),  # input embeddings → layer output, per layer
    ("cumulative_stable_rank_attn", pa.list_(pa.float64())),  # → attention output (before its residual add)
    ("cumulative_stable_rank_mlp", pa.list_(pa.float64())),  # → MLP output (before its residual add)
    ("cumulative_max_error", pa.float64()),  # worst reconstruction error over those cumulative Jacobians
    ("u_token_ids", pa.list_(pa.int64())),  # top token of each top left singular vector u₁, u₂, … of J⁺_last
    ("u_tokens", pa.list_(pa.string())),
    ("u_singular_values", pa.list_(pa.float64())),
    ("u1_matches_prediction", pa.bool_()),  # top token of u₁ == greedy next token
    ("seconds", pa.float64()),  # wall clock of the prompt's analysis
    ("cpu_seconds", pa.float64()),  # CPU time of its process meanwhile: the cost, also on a busy machine
    ("lllm_version", pa.string()),
    ("error", pa.string()),  # None on success, "ExceptionType: message" when the prompt failed
])


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def prompt_id(prompt: str) -> str:
    """The stable id of a prompt: the first 16 hex digits of the sha256 of its UTF-8 text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def read_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts of a file (one a line; blank lines and #-comments skipped), or the bundled set."""
    if path is None:
        text = importlib.resources.files("lllm.data").joinpath("prompts.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SweepError(f"cannot read the prompt file {path}: {exc}") from exc
        except UnicodeDecodeError as exc:
            line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
            raise SweepError(f"the prompt file {path} is not UTF-8 text (line {line}: {exc.reason}); "
                             "save it as UTF-8") from exc
    prompts = [line.strip() for line in text.splitlines()]
    return [p for p in prompts if p and not p.startswith("#")]


def _unique(prompts: Iterable[str]) -> list[str]:
    """The prompts in order with repeats dropped (a repeat has the same id, so it would be one row)."""
    seen: set[str] = set()
    unique = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise SweepError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        if prompt_id(prompt) in seen:
            log.warning("prompt %r appears more than once; it is analyzed once", prompt)
            continue
        seen.add(prompt_id(prompt))
        unique.append(prompt)
    return unique


# ---------------------------------------------------------------------------------------------
# The analysis of one prompt
# ---------------------------------------------------------------------------------------------


_LAYERS_SPEC = re.compile(r"^(all|none|every:[1-9][0-9]*|-?[0-9]+(,-?[0-9]+)*)$")


def check_layers_spec(spec: str) -> str:
    """The spec, normalized, if it is "all", "none", "every:K" (K ≥ 1) or "0,5,-1"; else SweepError."""
    normalized = spec.replace(" ", "").lower()
    if not _LAYERS_SPEC.match(normalized):
        raise SweepError(f"layers must be 'all', 'none', 'every:K' with K ≥ 1, or a comma-separated list of "
                         f"layer numbers (negative counts from the end), got {spec!r}")
    return normalized


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """Layer numbers of a spec: "all", "none", "every:K" (K-th layers back from the last), or "0,5,-1"."""
    spec = check_layers_spec(spec)
    if spec in ("all", "none"):
        return list(range(n_layers)) if spec == "all" else []
    if spec.startswith("every:"):
        return list(range(n_layers - 1, -1, -int(spec.removeprefix("every:"))))[::-1]
    numbers = [int(part) for part in spec.split(",")]
    bad = [n for n in numbers if not -n_layers <= n < n_layers]
    if bad:
        raise SweepError(f"layers {bad} are outside the model's {n_layers} layers")
    return sorted({n % n_layers for n in numbers})


def _stable_ranks(matrices: torch.Tensor) -> list[float]:
    """Stable rank Σ S²/S²_max of every wide matrix of matrices: (L, d, n), n ≥ d.

    From the eigenvalues of the (d, d) Gram matrix J Jᵀ in float64 (S² = its eigenvalues): the same
    quantity as lllm.analyses.decompose.stable_rank, about ten times faster than an SVD of a (576, 7·576) J.
    """
    ranks = []
    for matrix in matrices:
        wide = matrix.double()
        squares = torch.linalg.eigvalsh(wide @ wide.T).clamp_min(0)
        ranks.append(stable_rank(squares.sqrt()))
    return ranks


def analyze_prompt(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    layers: str = "all",
    components: Sequence[str] = COMPONENTS,
    method: str = "auto",
    top_k: int = 5,
    u_vectors: int = 3,
) -> dict[str, Any]:
    """The analysis columns of one prompt's row (see SCHEMA); raises on a prompt that cannot be analyzed."""
    token_ids = tokenize(tokenizer, prompt)
    d = model.config.hidden_size
    dtype = model.get_input_embeddings().weight.dtype
    check_fits(model, len(token_ids), default_chunk_size(d), dtype)  # refuses prompts beyond the positions
    embed(model, token_ids)  # refuses token ids outside the vocabulary with a PromptError
    following = top_next_tokens(model, tokenizer, token_ids, top_k)
    next_ids, next_probs = [t["id"] for t in following], [t["prob"] for t in following]
    n_layers = model.config.num_hidden_layers
    layer_list = resolve_layers(layers, n_layers)
    ranks: dict[str, list[float] | None] = {c: None for c in COMPONENTS}
    cumulative, max_error = None, None
    if layer_list:
        cumulative = cumulative_jacobians(model, tokenizer, token_ids, layers=layer_list, components=components,
                                          method=method, progress=False)
        for comp in components:
            jac = cumulative.jacobian[comp]
            ranks[comp] = _stable_ranks(jac.reshape(*jac.shape[:2], -1))
        max_error = max(max(cumulative.relative_errors(comp)) for comp in components)
    final = None if cumulative is None else final_from_cumulative(model, cumulative)  # already computed there
    if final is not None:
        final_method = cumulative.method
    else:
        final = detached_jacobian(model, tokenizer, token_ids, progress=False)
        final_method = "reverse"
    last = svd(final.block(-1), k=min(u_vectors, d), reference=final.output)
    decoded = decode_output(last.U.mT, model, tokenizer, k=1)
    u_ids = [entry.ids[0] for entry in decoded]
    return {
        "n_tokens": len(token_ids),
        "token_ids": token_ids,
        "tokens": final.tokens,
        "next_token_ids": next_ids,
        "next_tokens": [t["token"] for t in following],
        "next_probs": next_probs,
        "final_method": final_method,
        "reconstruction_error": final.relative_error,
        "stable_rank": _stable_ranks(final.combined[None])[0],
        "token_stable_ranks": per_token_stable_rank(final).tolist(),
        "layers": layer_list,
        **{f"cumulative_stable_rank_{c}": ranks[c] for c in COMPONENTS},
        "cumulative_max_error": max_error,
        "u_token_ids": u_ids,
        "u_tokens": [entry.tokens[0] for entry in decoded],
        "u_singular_values": last.S.tolist(),
        "u1_matches_prediction": u_ids[0] == next_ids[0],
    }


# ---------------------------------------------------------------------------------------------
# Batches, and the model each process loads once
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepConfig:
    """What determines a sweep's rows; parts computed under another config are not mixed in."""

    model: str
    dtype: str = "float32"
    layers: str = "all"
    components: tuple[str, ...] = COMPONENTS
    method: str = "auto"  # of the cumulative Jacobians; the rows are the same up to rounding
    top_k: int = 5
    u_vectors: int = 3
    loader: str = DEFAULT_LOADER  # "module:function" called as function(model, dtype) -> (model, tokenizer)
    lllm_version: str = ""

    def manifest(self) -> dict[str, Any]:
        """A JSON-able dict of the config."""
        return {**asdict(self), "components": list(self.components)}


_MODELS: dict[tuple[str, str, str], tuple[nn.Module, Any]] = {}
_LOADS: Counter = Counter()  # (loader, model, dtype) -> loads in this process, for tests and run logs
_MODELS_LOCK = threading.Lock()


def _resolve_loader(reference: str) -> Callable:
    """The function named by "module:function"."""
    module, _, name = reference.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SweepError(f"loader {reference!r} is not an importable module:function ({exc})") from exc


def _cached_model(config: SweepConfig) -> tuple[nn.Module, Any]:
    """This process's (model, tokenizer) for the config, loaded on first use and kept."""
    key = (config.loader, config.model, config.dtype)
    with _MODELS_LOCK:  # a multi-threaded worker must still load once
        if key not in _MODELS:
            _MODELS[key] = _resolve_loader(config.loader)(config.model, DTYPES[config.dtype])
            _LOADS[key] += 1
        return _MODELS[key]


def loads_in_process() -> dict[str, Any]:
    """{"pid", "loads": {"loader|model|dtype": count}}: how often this process loaded each model."""
    return {"pid": os.getpid(), "loads": {"|".join(key): n for key, n in _LOADS.items()}}


def _run_batch(config: SweepConfig, batch: list[str], threads: int) -> list[dict[str, Any]]:
    """Rows of a batch of prompts; a prompt that raises gets its error in its row."""
    torch.set_num_threads(threads)
    model, tokenizer = _cached_model(config)
    source = getattr(model, "lllm_source", None) or {}
    rows = []
    for prompt in batch:
        start, cpu = time.perf_counter(), time.process_time()
        row = {"model": config.model, "model_sha256": source.get("sha256"), "dtype": config.dtype,
               "prompt_id": prompt_id(prompt), "prompt": prompt, "lllm_version": config.lllm_version}
        try:
            row.update(analyze_prompt(model, tokenizer, prompt, layers=config.layers, components=config.components,
                                      method=config.method, top_k=config.top_k, u_vectors=config.u_vectors))
        except Exception as exc:  # any failure of one prompt is recorded and the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["seconds"], row["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Committed parts
# ---------------------------------------------------------------------------------------------


class PartStore:
    """The `<out>.parts/` directory: a manifest, complete part files, a run log and an exclusive lock."""

    MANIFEST = "sweep.json"
    RUNS = "runs.jsonl"

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self._lock_file = None

    def open(self, config: SweepConfig) -> None:
        """Take the lock, check or write the manifest, and delete temporaries of killed runs."""
        foreign = self.dir.is_dir() and any(not p.name.startswith(".") for p in self.dir.iterdir())
        if foreign and not (self.dir / self.MANIFEST).exists():
            raise SweepError(f"{self.dir} exists and is not the parts directory of a sweep; lllm does not write "
                             "into a directory it did not make. Give another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.dir / ".lock", "w")
        try:  # released by the kernel when the holder dies, so a killed run never leaves it stale
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise SweepError(f"another sweep is writing {self.dir}; wait for it or use another --out") from None
        manifest = self.dir / self.MANIFEST
        if manifest.exists():
            stored = json.loads(manifest.read_text())
            if stored != config.manifest():
                diff = {k: (stored.get(k), v) for k, v in config.manifest().items() if stored.get(k) != v}
                self.close()
                raise SweepError(f"{self.dir} holds rows of another sweep (stored vs requested: {diff}); "
                                 f"use another --out, or delete {self.dir} to start over")
        else:
            write_bytes_atomically(manifest, json.dumps(config.manifest(), indent=1).encode())
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink()

    def close(self) -> None:
        """Release the lock."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def parts(self) -> list[Path]:
        """The committed part files, oldest name first."""
        return sorted(self.dir.glob("part-*.parquet"))

    def read(self) -> pa.Table:
        """Every committed row."""
        tables = [pq.read_table(part, schema=SCHEMA) for part in self.parts()]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def commit(self, rows: list[dict[str, Any]], run_id: str, number: int) -> Path:
        """Write rows as one part file, atomically: complete or absent."""
        path = self.dir / f"part-{run_id}-{number:06d}.parquet"
        tmp = self.dir / f".{path.name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        replace_durably(tmp, path)
        return path

    def log_run(self, record: dict[str, Any]) -> None:
        """Append one JSON line describing a finished run to runs.jsonl."""
        with open(self.dir / self.RUNS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def runs(self) -> list[dict[str, Any]]:
        """The records of every finished run, oldest first."""
        path = self.dir / self.RUNS
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assemble(store: PartStore, prompts: list[str]) -> pa.Table:
    """The rows of `prompts`, in their order, from the committed parts (prompt_index set by this order)."""
    table = store.read()  # parts in the order they were committed
    ids, errors = table.column("prompt_id").to_pylist(), table.column("error").to_pylist()
    # A prompt has several rows only when --retry-failed computed a failed one again: keep the latest
    # successful row, else the latest failure.
    kept = {}  # prompt id -> the position of the row that stands for it
    for position, (pid, error) in enumerate(zip(ids, errors)):
        if pid not in kept or error is None or errors[kept[pid]] is not None:
            kept[pid] = position
    order = [kept[prompt_id(p)] for p in prompts if prompt_id(p) in kept]
    selected = table.take(pa.array(order, type=pa.int64()))
    index = pa.array([i for i, p in enumerate(prompts) if prompt_id(p) in kept], type=pa.int64())
    return selected.set_column(SCHEMA.get_field_index("prompt_index"), SCHEMA.field("prompt_index"), index)


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def _run_local(config, batches, commit, threads, progress) -> tuple[list[str], dict]:
    """Run batches in this process; returns (failures, model loads)."""
    previous = torch.get_num_threads()
    try:
        _cached_model(config)  # a model that cannot load fails the run here, before any prompt
        with tqdm(total=sum(map(len, batches)), desc=f"sweep {config.model}", unit="prompt",
                  disable=not progress) as bar:
            for number, batch in enumerate(batches):
                commit(number, _run_batch(config, batch, threads))
                bar.update(len(batch))
    finally:
        torch.set_num_threads(previous)
    return [], {"local": loads_in_process()}


def local_cluster(workers: int, threads: int = 1):
    """A LocalCluster of `workers` processes on 127.0.0.1, `threads` each, no dashboard."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                        dashboard_address=None)


def _run_dask(config, batches, commit, threads, progress, workers, scheduler) -> tuple[list[str], dict]:
    """Run batches as Dask tasks; commit each as it completes. Returns (failures, model loads per worker)."""
    from distributed import Client, as_completed

    cluster = local_cluster(workers, threads) if scheduler is None else None
    client = Client(cluster if cluster is not None else scheduler)
    failures = []
    try:
        futures = {client.submit(_run_batch, config, batch, threads, pure=False): number
                   for number, batch in enumerate(batches)}
        with tqdm(total=sum(map(len, batches)), desc=f"sweep {config.model} (dask)", unit="prompt",
                  disable=not progress) as bar:
            for future in as_completed(futures):
                number = futures[future]
                if future.status == "finished":
                    commit(number, future.result())
                else:  # a lost worker or a model that does not load: not the prompts' fault
                    reason = future.exception() if future.status == "error" else future.status
                    failures.append(f"batch {number} ({len(batches[number])} prompts): {reason!r}")
                bar.update(len(batches[number]))
                future.release()
        loads = client.run(loads_in_process)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return failures, loads


def run_sweep(
    model_name: str,
    prompts: Sequence[str] | str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    engine: str = "local",
    workers: int = 2,
    scheduler: str | None = None,
    batch_size: int = 1,
    dtype: str = "float32",
    layers: str = "all",
    components: Sequence[str] = COMPONENTS,
    method: str = "auto",
    threads: int = 1,
    loader: str | Callable = DEFAULT_LOADER,
    progress: bool = True,
    retry_failed: bool = False,
) -> pd.DataFrame:
    """Analyze every prompt with one model; rows are committed as they finish and assembled into `out`.

    prompts: a list, a prompt file, or None for the bundled set. Prompts that already have a
    committed row in `<out>.parts/` are not computed again; with retry_failed, those whose row holds an
    error are (their new row replaces it). threads: torch intra-op threads per
    process (1 makes the rows of both engines identical). loader: "module:function" (or such a
    function) called as loader(model_name, torch_dtype) -> (model, tokenizer).
    """
    import lllm

    check_choice(engine, "engine", ENGINES)
    check_choice(dtype, "dtype", tuple(DTYPES))
    components = check_components(components, COMPONENTS)
    check_choice(method, "method", METHODS)
    for name, value in (("batch_size", batch_size), ("workers", workers), ("threads", threads)):
        check_int(value, name, minimum=1)
    if callable(loader):
        loader = f"{loader.__module__}:{loader.__qualname__}"
    layers = check_layers_spec(layers)  # before any model is loaded
    prompt_file = prompts if isinstance(prompts, (str, os.PathLike)) else None
    check_output(out, inputs=[prompt_file])
    prompt_list = _unique(read_prompts(prompts) if prompts is None or prompt_file is not None else prompts)
    if not prompt_list:
        raise SweepError("there are no prompts to analyze")
    if engine == "dask" and scheduler is not None:
        check_scheduler(scheduler)
    config = SweepConfig(model=model_name, dtype=dtype, layers=layers, components=tuple(components), method=method,
                         loader=loader, lllm_version=lllm.__version__)
    store = PartStore(out)
    store.open(config)
    try:
        start, run_id = time.perf_counter(), _run_id()
        finished = _finished(store, retry_failed)
        todo = [p for p in prompt_list if prompt_id(p) not in finished]
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        computed = Counter()

        def commit(number: int, rows: list[dict]) -> None:
            store.commit(rows, run_id, number)
            computed["rows"] += len(rows)
            computed["errors"] += sum(row.get("error") is not None for row in rows)

        failures, loads = [], {}
        if batches and engine == "local":
            failures, loads = _run_local(config, batches, commit, threads, progress)
        elif batches:
            failures, loads = _run_dask(config, batches, commit, threads, progress, workers, scheduler)
        complete = not failures
        if complete:
            table = _assemble(store, prompt_list)
            tmp = store.dir / f".{store.out.name}.{run_id}.tmp"  # in the parts: a killed run's is cleaned
            pq.write_table(table, tmp)
            replace_durably(tmp, store.out)
        store.log_run({
            "run_id": run_id, "engine": engine, "workers": workers if engine == "dask" else 1, "threads": threads,
            "batch_size": batch_size, "requested": len(prompt_list), "already_done": len(prompt_list) - len(todo),
            "computed": computed["rows"], "failed_prompts": computed["errors"], "failed_batches": failures,
            "seconds": time.perf_counter() - start, "model_loads": loads, "complete": complete,
        })
    finally:
        store.close()
    if failures:
        raise SweepIncompleteError(
            f"{len(failures)} batch(es) failed outside their prompts' analysis (a lost worker, or a model that does "
            f"not load), first: {failures[0]}. Their prompts have no rows yet; once the cause is fixed, the same "
            f"command computes only those. ({store.out} is not written until every prompt has a row)"
        )
    return load_sweep(store.out)


def check_output(out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """`out` as a sweep's result file: writable, not an input, and not a file that lllm did not write."""
    out = writable_file(out, "--out", inputs=inputs)
    if out.exists():
        try:
            schema = pq.read_schema(out)
        except (OSError, pa.ArrowException) as exc:
            raise OutputPathError(f"--out {out} exists and is not a sweep result ({type(exc).__name__}); "
                                  "lllm does not overwrite a file it did not write. Give another --out") from None
        if not set(SCHEMA.names) <= set(schema.names):
            raise OutputPathError(f"--out {out} is a Parquet file but not a sweep result (it lacks "
                                  f"{sorted(set(SCHEMA.names) - set(schema.names))[:3]}…); give another --out")
    return out


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """Refuse, within `timeout` seconds, a Dask scheduler address where nothing listens."""
    if not isinstance(address, str) or not address.strip():
        raise SweepError(f"the scheduler must be an address such as tcp://host:8786, got {address!r}")
    if "://" in address and not address.startswith("tcp://"):
        return  # tls://, ucx://, inproc://: Dask itself connects and reports
    match = re.match(r"^(?:tcp://)?\[?([^\]/]+?)\]?(?::(\d+))?/?$", address.strip())
    if match is None:
        raise SweepError(f"--scheduler {address!r} is not an address such as tcp://host:8786")
    host, port = match.group(1), int(match.group(2) or 8786)  # 8786: Dask's default scheduler port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise SweepError(f"no Dask scheduler answers at {address} ({exc}); start one (dask scheduler) or leave "
                         "out --scheduler to run a local cluster") from None


def _finished(store: PartStore, retry_failed: bool) -> set[str]:
    """Ids of the prompts that need no computing: every committed row, or only the successful ones."""
    rows = store.read().select(["prompt_id", "error"]).to_pylist()
    return {row["prompt_id"] for row in rows if row["error"] is None or not retry_failed}


def _run_id() -> str:
    """A sortable, unique name for this run's part files."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------
# Reading and summarizing results
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The `lllm sweep` command
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lllm sweep`."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, hub id, local dir or GGUF")
    parser.add_argument("--prompts", metavar="FILE", help="one prompt a line, #-comments (default: the bundled set)")
    parser.add_argument("--out", required=True, help="result Parquet file; committed parts go to OUT.parts/")
    parser.add_argument("--engine", choices=ENGINES, default="local")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes of the LocalCluster")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler instead of a LocalCluster")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per task and per committed part file")
    parser.add_argument("--layers", default="all",
                        help="cumulative Jacobians of: all | none | every:K | 0,5,-1 (default: all)")
    parser.add_argument("--components", default=",".join(COMPONENTS), help="of layer,attn,mlp")
    parser.add_argument("--method", choices=METHODS, default="auto", help="of the cumulative Jacobians")
    parser.add_argument("--fast", action="store_true",
                        help="--layers every:3 --components layer --method reverse: cheaper than the default "
                        "from about 9 tokens on")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; 1 keeps rows identical across engines")
    parser.add_argument("--loader", default=DEFAULT_LOADER, help="module:function returning (model, tokenizer)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="compute again the prompts whose committed row holds an error")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the sweep and print its headline statistics."""
    analysis = {"layers": args.layers, "components": tuple(c.strip() for c in args.components.split(",") if c.strip()),
                "method": args.method}
    if args.fast:
        if (args.layers, args.components, args.method) != ("all", ",".join(COMPONENTS), "auto"):
            raise SweepError("--fast sets --layers, --components and --method; pass either --fast or those")
        analysis = FAST
    start = time.perf_counter()
    try:
        df = run_sweep(
            args.model, args.prompts, args.out, engine=args.engine, workers=args.workers, scheduler=args.scheduler,
            batch_size=args.batch_size, dtype=args.dtype, threads=args.threads, loader=args.loader,
            progress=not args.no_progress, retry_failed=args.retry_failed, **analysis,
        )
    except KeyboardInterrupt:  # Ctrl-C: what is committed stays; say how to go on rather than print a traceback
        store = PartStore(args.out)
        print(f"\nlllm sweep: interrupted; {len(store.read())} prompts are committed in {store.dir}. "
              f"The same command computes only the rest.", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention
    summary = summarize_sweep(df)
    last_run = PartStore(args.out).runs()[-1]
    print(f"{summary['n_prompts']} prompts ({last_run['computed']} computed now, {last_run['already_done']} "
          f"already done), {summary['n_failed']} failed; {time.perf_counter() - start:.1f} s → {args.out}")
    if summary["n_failed"]:
        print(f"{summary['n_failed']} prompts failed (the error column says why); once the cause is fixed, "
              "--retry-failed computes them again")
    if summary["median_reconstruction_error"] is not None:
        print(f"median reconstruction error {summary['median_reconstruction_error']:.3e}; "
              f"top U decodes to the prediction in {summary['u1_match_rate']:.0%}")
    for comp, stats in summary["depth_vs_stable_rank"].items():
        print(f"{comp:>5}: Spearman ρ(layer, stable rank) = {stats['spearman_rho']:+.2f}")
    return 0
