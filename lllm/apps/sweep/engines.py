"""Running a sweep: the configuration, the model each process loads once, a batch of prompt rows
(`lllm.analyses.pipeline.prompt_row`), and the local and Dask engines that commit them."""

from __future__ import annotations

import datetime
import importlib
import importlib.resources
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from lllm.defaults import DTYPES
from lllm.errors import OutputPathError, SweepError, SweepIncompleteError
from lllm.kernel.jacobian import text_config
from lllm.analyses.pipeline import prompt_row
from lllm.kernel.layers import COMPONENTS, METHODS
from lllm.io.files import replace_durably
from lllm.validation import check_choice, check_components, check_int, writable_file

from lllm.apps.sweep.prompts import check_layers_spec, prompt_id, read_prompts, resolve_layers, unique_prompts
from lllm.apps.sweep.parts import SCHEMA, PartStore, assemble_rows
from lllm.apps.sweep.results import load_sweep


log = logging.getLogger("lllm.apps.sweep")


DEFAULT_LOADER = "lllm.io.models:load"


ENGINES = ("local", "dask")


# The stable rank by depth in about a third of the faithful time (see the module docstring).
FAST = {"layers": "every:3", "components": ("layer",), "method": "reverse"}


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
    """Rows of a batch of prompts; a prompt that raises gets its error in its row. Runs with `threads` torch threads
    (the same float operations in every process), restoring the caller's setting after."""
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _rows(config, batch)
    finally:
        torch.set_num_threads(caller_threads)


def _rows(config: SweepConfig, batch: list[str]) -> list[dict[str, Any]]:
    """The rows of a batch, in this process's torch threads."""
    model, tokenizer = _cached_model(config)
    source = getattr(model, "lllm_source", None) or {}
    rows = []
    for prompt in batch:
        start, cpu = time.perf_counter(), time.process_time()
        row = {"model": config.model, "model_sha256": source.get("sha256"), "dtype": config.dtype,
               "prompt_id": prompt_id(prompt), "prompt": prompt, "lllm_version": config.lllm_version}
        try:
            layers = resolve_layers(config.layers, text_config(model).num_hidden_layers)
            row.update(prompt_row(model, tokenizer, prompt, layers=layers, components=config.components,
                                  method=config.method, top_k=config.top_k, u_vectors=config.u_vectors))
        except Exception as exc:  # any failure of one prompt is recorded and the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["seconds"], row["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        rows.append(row)
    return rows


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
    prompt_list = unique_prompts(read_prompts(prompts) if prompts is None or prompt_file is not None else prompts)
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
            table = assemble_rows(store, prompt_list)
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
