"""Executing the runs through papermill, concurrently (one kernel per core, torch threads divided among them),
with each run's time and peak memory in a build report."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path


from lllm.apps.book.runs import Failure, Run, RunCost, is_unchanged, output_digests


@dataclass
class BookReport:
    """What `build_book` did: which runs executed, were skipped or failed, and the build outcome."""

    executed: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)  # inputs unchanged since the last success
    failures: list[Failure] = field(default_factory=list)
    run_seconds: float = 0.0
    toc: Path | None = None
    built: bool = False  # the HTML build ran and succeeded
    build_seconds: float | None = None
    build_log: Path | None = None
    build_errors: list[str] = field(default_factory=list)  # warnings/errors of a failed build
    html: Path | None = None  # index.html of a successful build
    costs: dict[str, RunCost] = field(default_factory=dict)  # run label -> what its execution cost
    jobs: int = 1

    @property
    def ok(self) -> bool:
        """True when no notebook failed and the build (if asked for) succeeded."""
        return not self.failures and not self.build_errors

    def rows(self) -> list[dict]:
        """One row per run: chapter, model, what happened, seconds and peak RSS (MB) of its kernel."""
        rows = []
        failed = {failure.label for failure in self.failures}
        for run in [*self.executed, *self.skipped, *self.failures]:
            label = run.label
            cost = self.costs.get(label)
            rows.append({
                "notebook": run.notebook.path.name if isinstance(run, Run) else run.notebook,
                "chapter": run.notebook.chapter if isinstance(run, Run) else run.chapter,
                "model": run.model, "outcome": "failed" if label in failed else
                "executed" if cost is not None else "reused",
                "seconds": None if cost is None else round(cost.seconds, 1),
                "peak_rss_mb": None if cost is None else round(cost.peak_rss / 2**20),
            })
        return rows

    def table(self) -> str:
        """The rows as a fixed-width table, slowest first, with a total line."""
        rows = sorted(self.rows(), key=lambda r: -(r["seconds"] or 0))
        lines = [f"{'chapter':<18} {'model':<20} {'outcome':<9} {'seconds':>8} {'peak RSS':>10}"]
        for r in rows:
            seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
            rss = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']} MB"
            lines.append(f"{r['chapter']:<18} {r['model'] or 'all models':<20} {r['outcome']:<9} {seconds:>8} {rss:>10}")
        busy = sum(r["seconds"] or 0 for r in rows)
        lines.append(f"{'total':<49} {busy:>8.1f}  (notebook seconds; {self.run_seconds:.1f} s wall on {self.jobs} "
                     f"job(s))")
        return "\n".join(lines)

    def write(self, path: Path) -> Path:
        """build-report.json: every run's outcome, seconds and peak RSS, and the build's."""
        report = {"jobs": self.jobs, "run_seconds": round(self.run_seconds, 1), "runs": self.rows(),
                  "build": {"built": self.built, "seconds": self.build_seconds and round(self.build_seconds, 1)}}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        return path

    def summary(self) -> str:
        """A human-readable account of the runs, the failures and the build."""
        lines = [f"notebooks: {len(self.executed)} executed, {len(self.skipped)} unchanged (skipped), "
                 f"{len(self.failures)} failed, in {self.run_seconds:.1f} s"]
        if self.costs:
            lines.append(self.table())
        if self.failures:
            lines.append(f"{len(self.failures)} notebook run(s) failed:")
            lines += [str(failure) for failure in self.failures]
        if self.build_seconds is not None:
            state = "built" if self.built else "FAILED to build"
            lines.append(f"book {state} in {self.build_seconds:.1f} s (log: {self.build_log})")
            lines += [f"    {line}" for line in self.build_errors]
        if self.html:
            lines.append(f"open {self.html}")
        return "\n".join(lines)


def execute_measured(run: Run) -> tuple[Failure | None, RunCost]:
    """`execute(run)` with its wall time and the peak RSS of the kernel it starts (sampled in a thread)."""
    import psutil

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            try:
                kernels = me.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in kernels))
            except psutil.Error:
                pass  # a kernel that exited between listing and reading

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    try:
        failure = execute(run)
    finally:
        done.set()
        sampler.join()
    return failure, RunCost(seconds=time.perf_counter() - start, peak_rss=peak[0])


def execute(run: Run) -> Failure | None:
    """Execute one run with papermill in the notebooks directory; a Failure if a cell raised, else None."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    run.output.parent.mkdir(parents=True, exist_ok=True)
    run.figures.mkdir(parents=True, exist_ok=True)
    run.record.unlink(missing_ok=True)  # an interrupted or failed execution must never count as unchanged
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(run.notebook.path), str(run.output), parameters=run.parameters, cwd=str(run.notebook.path.parent),
            progress_bar=False, log_output=False,
            # the kernel's own log would warn on every start that its localhost TCP sockets are unencrypted
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except PapermillExecutionError as err:
        return Failure(
            notebook=run.notebook.path.name, chapter=run.notebook.chapter, model=run.model,
            cell_index=_source_cell_index(run.notebook.path, err.source), execution_count=err.exec_count,
            cell_source=err.source, error=f"{err.ename}: {err.evalue}", output=run.output,
        )
    except Exception as err:  # a dead kernel or an unreadable notebook is one failure among many, not the end
        return Failure(
            notebook=run.notebook.path.name, chapter=run.notebook.chapter, model=run.model, cell_index=None,
            execution_count=None, cell_source="", error=f"{type(err).__name__}: {err}", output=run.output,
        )
    hide_code(run.output)
    record = {"key": run.key, "notebook": run.notebook.path.name, "parameters": run.parameters,
              "seconds": round(time.perf_counter() - start, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "outputs": output_digests(run)}
    run.record.write_text(json.dumps(record, indent=1) + "\n")
    return None


def hide_code(path: Path) -> None:
    """Collapse every code cell's source on the rendered page (Jupyter Book's hide-input: the reader sees prose,
    figures and tables first, the code one click away); the notebook still runs unchanged under papermill."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        tags = cell.metadata.setdefault("tags", [])
        if cell.cell_type == "code" and not any(t.startswith(("hide-", "remove-")) for t in tags):
            tags.append("hide-input")
    nbformat.write(notebook, path)


def _source_cell_index(path: Path, source: str) -> int | None:
    """Index of the cell with this source in the notebook as written (papermill's index counts its injected cell)."""
    import nbformat

    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.source == source:
            return index
    return None


def python_path_with_this_lllm() -> str:
    """PYTHONPATH with the directory holding this lllm package first."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH")]))


@contextmanager
def _kernel_environment(threads: int | None = None) -> Iterator[None]:
    """Environment of the notebook kernels (they inherit it): this lllm importable, no progress bars.

    PYTHONPATH gets this lllm's parent directory, so that kernels import the lllm that runs the
    driver even from an uninstalled checkout. TQDM_DISABLE turns off every tqdm bar (lllm's and
    transformers' GGUF loading): in an executed notebook they are only hundreds of stderr lines.
    The warning filter silences tqdm.auto's "IProgress not found" on import in a kernel without
    ipywidgets, which a static offline book could not display anyway. `threads` sets the kernels'
    OpenMP threads (torch's intra-op threads) and SciPy's OpenBLAS threads (the Gram matrices' syrk),
    so that concurrent kernels share the cores. Where the Hugging Face hub cannot be reached and the
    user has not said either way (HF_HUB_OFFLINE), the kernels run offline: a notebook about a hub
    model then says at once that it is not available, instead of printing a page of "Retrying in Ns"
    while transformers retries.
    """
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found:Warning"]))
    overrides = {"PYTHONPATH": python_path_with_this_lllm(), "TQDM_DISABLE": "1", "PYTHONWARNINGS": warnings}
    if threads is not None:  # the cores divided among the kernels that run at once
        overrides.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                          "OPENBLAS_NUM_THREADS")})
    from lllm.io.models import hub_reachable  # late: the driver itself does not need torch

    if not any(name in os.environ for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) and not hub_reachable():
        overrides["HF_HUB_OFFLINE"] = "1"
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def execute_all(runs: Sequence[Run], *, jobs: int = 1, force: bool = False, progress: bool = True) -> BookReport:
    """Execute every run not unchanged (all of them if `force`), `jobs` at a time, all-models runs last."""
    from tqdm import tqdm

    report = BookReport(jobs=jobs)
    start = time.perf_counter()
    todo = []
    for run in runs:
        if not force and is_unchanged(run):
            report.skipped.append(run)
        else:
            todo.append(run)
    # Per-model runs first, the all-models runs (which read their results) after them. Within a stage `next_run`
    # picks the order; this list, interleaved by model, only breaks its ties.
    by_model: dict[str, list[Run]] = {}
    for run in todo:
        if run.model is not None:
            by_model.setdefault(run.model, []).append(run)
    interleaved = [run for batch in itertools.zip_longest(*by_model.values()) for run in batch if run is not None]
    stages = [interleaved, [r for r in todo if r.model is None]]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))  # the cores divided among the kernels at once
    with _kernel_environment(threads), tqdm(total=len(runs), initial=len(report.skipped), desc="lllm book",
                                           unit="notebook", disable=not progress) as bar:
        for stage in stages:
            for run, (failure, cost) in _execute_stage(stage, jobs, bar):
                report.costs[run.label] = cost
                if failure is None:
                    report.executed.append(run)
                else:
                    report.failures.append(failure)
    # report in plan order, whatever order the processes finished in
    position = {run.label: i for i, run in enumerate(runs)}
    report.executed.sort(key=lambda run: position[run.label])
    report.failures.sort(key=lambda failure: position[failure.label])
    report.run_seconds = time.perf_counter() - start
    return report


def _groups(run: Run) -> set[tuple[str | None, str]]:
    """The (model, name) of every cached computation `run` shares with other runs (notebook metadata "shares")."""
    return {(run.model, name) for name in run.notebook.shares}


def next_run(pending: list[Run], running: Sequence[Run], done: set) -> Run | None:
    """The run to start next, or None while every pending one waits for a running one.

    Runs that share a cached computation of one model (the per-prompt analysis) run one at a time: the first
    computes it, the others read it afterwards instead of holding a process while they wait on its lock. The
    run that will compute a shared result goes first, then the runs that share nothing, then the readers; within
    each, the larger model first (its runs are the longest: started last, they would end the build alone).
    """
    busy = set().union(*map(_groups, running))
    ready = [run for run in pending if not _groups(run) & busy]
    if not ready:
        return None
    rank = lambda run: 0 if _groups(run) - done else 2 if _groups(run) else 1  # noqa: E731
    return min(ready, key=lambda run: (rank(run), -_weights_size(run.model), pending.index(run)))


def _weights_size(model: str | None) -> int:
    """Bytes of a model's weights file where known without loading it (an embedded model, a local file), else 0."""
    from lllm.io.embedded import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].size or 0
    return os.path.getsize(model) if model is not None and os.path.isfile(model) else 0


def _execute_stage(runs: Sequence[Run], jobs: int, bar) -> Iterator[tuple[Run, tuple[Failure | None, RunCost]]]:
    """(run, (failure or None, cost)) for each run, executed in this process or in a pool of `jobs` processes, in
    the order `next_run` picks."""
    pending, done = list(runs), set()
    if jobs <= 1 or len(runs) <= 1:
        while pending:
            run = next_run(pending, [], done)
            pending.remove(run)
            bar.set_postfix_str(run.label, refresh=True)
            failure, cost = execute_measured(run)
            yield run, (failure, cost)
            if failure is None:  # a failed computer leaves its result to the next reader
                done |= _groups(run)
            bar.update()
        return
    # processes, not threads: papermill chdirs into the notebook's directory, which is process-wide
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        running: dict = {}
        while pending or running:
            while len(running) < jobs and (run := next_run(pending, list(running.values()), done)) is not None:
                pending.remove(run)
                running[pool.submit(execute_measured, run)] = run
            bar.set_postfix_str(f"{len(running)} running, {len(pending)} queued on {jobs} processes", refresh=True)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run, (failure, cost) = running.pop(future), future.result()
                if failure is None:  # a failed computer leaves its result to the next reader
                    done |= _groups(run)
                bar.set_postfix_str(f"done {run.label}", refresh=True)
                yield run, (failure, cost)
                bar.update()
