"""`lllm book`: run every paper notebook for every model through papermill, then build the Jupyter Book.

Notebooks are discovered from their notebook-level metadata, nothing is listed by hand::

    {"lllm": {"chapter": "fig3", "title": "Figure 3: ...", "order": 3, "scope": "per_model"}}

A ``per_model`` notebook runs once per model with the parameters model, prompt, dtype, fast and
output_dir; an ``all_models`` notebook runs once, after the per-model ones, with models (a list),
prompt, dtype, fast and output_dir. Executed notebooks go to
``<book>/generated/<chapter>/<model-slug>.ipynb`` and figure files to
``<book>/generated/figures/<chapter>/<model-slug>/``. A run whose inputs (notebook source,
parameters, lllm code, and the data files named by the optional metadata ``"reads"``: glob patterns
from the notebook's directory, such as sweep output) are unchanged since its last success is skipped. A failing notebook does not
stop the others; every failure is reported with its notebook, model and cell. Then
``<book>/_toc.yml`` is written from what ran and the book is built with ``jupyter-book build -W``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from lllm.errors import BookBuildError, NotebookMetadataError, PromptError
from lllm.defaults import DEFAULT_PROMPT, DTYPES
from lllm.validation import check_int

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
# The CI configuration: the smallest model and a two-token prompt; notebooks see fast=True.
FAST_MODELS = ("smollm2-135m",)
FAST_PROMPT = "The Golden"
SCOPES = ("per_model", "all_models")
ALL_MODELS_SLUG = "all-models"

# Pages of the book that do not come from notebooks, as paths relative to the book directory.
INTRO_PAGES = ("intro.md", "method.md")  # the first is the book's root (index.html)
REFERENCE_PAGES = ("run_your_model.md", "api.md")
# Discussion pages live in <book>/pages/. Every pages/*.md is built: those named here first, in this
# order, then any others alphabetically. To add a page, write the file (and list it here to place it).
PAGES_DIR = "pages"
PAGE_ORDER = ("paper_vs_book.md", "linearization_choice.md", "performance.md", "at_scale.md")

# Modules documented on the API page (book/api.md, through book/_ext/lllm_api.py), in reading order.
# A listed module that does not exist yet is left out; one that exists must import and document
# cleanly, since the book is built with -W.
API_MODULES = (
    "lllm.io.models", "lllm.kernel.oplevel", "lllm.kernel.parts", "lllm.kernel.jacobian", "lllm.kernel.layers", "lllm.kernel.matfree",
    "lllm.analyses.decompose", "lllm.analyses.steering", "lllm.io.store", "lllm.apps.sweep", "lllm.apps.book", "lllm.errors",
)

# Modules that only drive notebooks and cannot change their results; editing them re-runs nothing.
_DRIVER_MODULES = ("apps/book", "apps/cli.py")  # relative to the package: the driver itself, whose edits re-run nothing
_CHAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class NotebookSpec:
    """One paper notebook and its declared place in the book."""

    path: Path
    chapter: str
    title: str
    order: float
    scope: str  # "per_model" or "all_models"
    summary: str  # the chapter page's text: metadata "summary", else the first markdown cell
    reads: tuple[str, ...] = ()  # glob patterns (from the notebook's directory) of data files made elsewhere
    parameters: frozenset[str] = frozenset()  # names assigned in its `parameters` cell


@dataclass(frozen=True)
class Run:
    """One execution: a notebook with the parameters of one model (or of all models)."""

    notebook: NotebookSpec
    model: str | None  # None for an all_models notebook
    parameters: dict
    output: Path  # the executed notebook
    key: str  # hash of everything the execution depends on

    @property
    def label(self) -> str:
        """'chapter × model', how progress and failures name this run."""
        return f"{self.notebook.chapter} × {self.model or 'all models'}"

    @property
    def record(self) -> Path:
        """The file beside the output that records the key of the last successful execution."""
        return self.output.with_suffix(".run.json")


@dataclass(frozen=True)
class Failure:
    """A run that raised: where (notebook, model, cell) and what."""

    notebook: str  # file name of the source notebook
    chapter: str
    model: str | None
    cell_index: int | None  # index of the failing cell in the source notebook (0-based); None if not a cell
    execution_count: int | None  # the "In [n]" of the failing cell in the executed notebook
    cell_source: str
    error: str  # "ExceptionName: message"
    output: Path  # the executed notebook, with the traceback in the failing cell

    @property
    def label(self) -> str:
        """'chapter × model', as for the Run that failed."""
        return f"{self.chapter} × {self.model or 'all models'}"

    def __str__(self) -> str:
        if self.cell_index is not None:
            where = f"cell {self.cell_index} (In [{self.execution_count}])"
        elif self.execution_count is not None:
            where = f"In [{self.execution_count}]"
        else:
            where = "outside any cell"  # the kernel did not start, or died
        lines = [f"{self.notebook} × {self.model or 'all models'}: {where} raised {self.error}"]
        lines += [f"    | {line}" for line in self.cell_source.splitlines()[:6]]
        lines.append(f"    executed notebook: {self.output}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RunCost:
    """What one execution cost: wall seconds and the peak resident memory of its kernel."""

    seconds: float
    peak_rss: int  # bytes, sampled every 0.2 s over the kernel process tree


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


# ---------------------------------------------------------------------------------------------
# Discovery and planning
# ---------------------------------------------------------------------------------------------


def discover(notebooks_dir: Path) -> list[NotebookSpec]:
    """Every notebook in `notebooks_dir` with its `lllm` metadata, in book order (order, then chapter)."""
    import nbformat

    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise BookBuildError(f"notebooks directory {notebooks_dir} does not exist; pass --notebooks-dir")
    specs: dict[str, NotebookSpec] = {}
    for path in sorted(notebooks_dir.glob("*.ipynb")):
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as err:  # nbformat raises JSON, validation and version errors of many types
            raise NotebookMetadataError(f"{path} is not a readable notebook: {err}") from err
        spec = _spec_from_metadata(path, nb)
        if spec.chapter in specs:
            raise NotebookMetadataError(
                f"{path.name} and {specs[spec.chapter].path.name} both declare chapter {spec.chapter!r}; "
                "each chapter comes from exactly one notebook"
            )
        specs[spec.chapter] = spec
    return sorted(specs.values(), key=lambda s: (s.order, s.chapter))


def _spec_from_metadata(path: Path, nb) -> NotebookSpec:
    """Validate one notebook's `lllm` metadata and its `parameters` cell."""
    meta = nb.metadata.get("lllm")
    example = '{"lllm": {"chapter": "fig3", "title": "Figure 3: ...", "order": 3, "scope": "per_model"}}'
    if not isinstance(meta, dict):
        raise NotebookMetadataError(f"{path} has no 'lllm' entry in its notebook metadata; add e.g. {example}")
    missing = [k for k in ("chapter", "title", "order", "scope") if k not in meta]
    if missing:
        raise NotebookMetadataError(f"{path}: notebook metadata 'lllm' lacks {missing}; expected e.g. {example}")
    chapter, scope = str(meta["chapter"]), meta["scope"]
    if not _CHAPTER_NAME.match(chapter):
        raise NotebookMetadataError(f"{path}: chapter {chapter!r} must be lowercase letters, digits, '-' or '_'")
    if scope not in SCOPES:
        raise NotebookMetadataError(f"{path}: scope {scope!r} is not one of {SCOPES}")
    if not isinstance(meta["order"], (int, float)):
        raise NotebookMetadataError(f"{path}: order {meta['order']!r} is not a number")
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise NotebookMetadataError(
            f"{path} has no cell tagged 'parameters'; papermill injects the model and prompt after that cell"
        )
    try:
        names = frozenset(t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                          for t in node.targets if isinstance(t, ast.Name))
    except SyntaxError as err:
        raise NotebookMetadataError(f"{path}: its parameters cell is not valid Python: {err}") from err
    reads = meta.get("reads", [])
    if not (isinstance(reads, list) and all(isinstance(r, str) and r for r in reads)):
        raise NotebookMetadataError(f"{path}: 'reads' {reads!r} must be a list of glob patterns")
    summary = meta.get("summary") or _first_markdown_text(nb)
    return NotebookSpec(path=path.resolve(), chapter=chapter, title=str(meta["title"]), order=float(meta["order"]),
                        scope=scope, summary=summary, reads=tuple(reads), parameters=names)


def _first_markdown_text(nb) -> str:
    """The first markdown cell without its heading lines: a notebook's own introduction."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            return "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("#")).strip()
    return ""


def model_slug(model: str) -> str:
    """A file-name-safe name for a model: the short name, a hub id with '/' as '--', or a path's stem + hash."""
    path = Path(model).expanduser()
    if path.exists():  # two local models with the same file name must not overwrite each other
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        model = f"{path.stem or path.name}-{digest}"
    slug = re.sub(r"[^a-z0-9._-]+", "-", model.lower().replace("/", "--")).strip("-.")
    if not slug:
        raise BookBuildError(f"model name {model!r} has no letters or digits to name its output files by")
    return slug


def code_fingerprint() -> str:
    """lllm's version and a hash of its source (minus the driver): a notebook re-runs when either changes."""
    from lllm import __version__

    digest = hashlib.sha256(__version__.encode())
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        if str(source.relative_to(package).as_posix()).startswith(_DRIVER_MODULES):
            continue
        digest.update(str(source.relative_to(package)).encode())
        digest.update(source.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def inputs_digest(spec: NotebookSpec) -> bytes:
    """A hash of the names and contents of the data files the notebook declares it reads ('reads' metadata)."""
    digest = hashlib.sha256()
    for pattern in spec.reads:
        for path in sorted(p for p in spec.path.parent.glob(pattern) if p.is_file()):
            digest.update(pattern.encode() + path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.digest()


def plan(
    specs: Sequence[NotebookSpec], models: Sequence[str], prompt: str, dtype: str, fast: bool, book_dir: Path,
    fingerprint: str,
) -> list[Run]:
    """Every run, per-model notebooks first (in book order, model by model), then all-models ones."""
    generated = Path(book_dir).resolve() / "generated"
    common = {"prompt": prompt, "dtype": dtype, "fast": fast}
    per_model, all_models = [], []
    for spec in specs:
        targets = [(m, model_slug(m)) for m in models] if spec.scope == "per_model" else [(None, ALL_MODELS_SLUG)]
        for model, slug in targets:
            figures = generated / "figures" / spec.chapter / slug
            # an all-models notebook about one fixed model of its own (figa1) does not declare `models`
            own = {"model": model} if model is not None else (
                {"models": list(models)} if "models" in spec.parameters else {})
            parameters = {**own, **common, "output_dir": str(figures)}
            # the key uses output_dir relative to the book, so that moving the checkout re-runs nothing
            hashed = {**parameters, "output_dir": str(figures.relative_to(generated))}
            key = hashlib.sha256(
                spec.path.read_bytes() + json.dumps(hashed, sort_keys=True).encode() + fingerprint.encode()
                + inputs_digest(spec)
            ).hexdigest()
            run = Run(notebook=spec, model=model, parameters=parameters,
                      output=generated / spec.chapter / f"{slug}.ipynb", key=key)
            (per_model if model is not None else all_models).append(run)
    return per_model + all_models


def select(specs: Sequence[NotebookSpec], only: Sequence[str] | None) -> list[NotebookSpec]:
    """The notebooks named in `only` (by chapter or file stem), or all of them."""
    if not only:
        return list(specs)
    known = {s.chapter: s for s in specs} | {s.path.stem: s for s in specs}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise BookBuildError(f"no notebook has chapter or name {unknown}; known chapters: {[s.chapter for s in specs]}")
    wanted = {known[name].chapter for name in only}
    return [s for s in specs if s.chapter in wanted]


def is_unchanged(run: Run) -> bool:
    """True when the output exists, was produced by a successful execution with the same key, and it and its
    figures still have the sha256 digests recorded then."""
    if not (run.output.exists() and run.record.exists()):
        return False
    try:
        record = json.loads(run.record.read_text())
        # the outputs are derived files too: one changed byte in the notebook or a figure re-runs it
        return record.get("key") == run.key and record.get("outputs") == _output_digests(run)
    except (json.JSONDecodeError, OSError, AttributeError):
        return False  # a damaged record only costs a re-run


def _output_digests(run: Run) -> dict[str, str]:
    """sha256 of the executed notebook and of every file its run wrote into its output directory."""
    figures = Path(run.parameters["output_dir"])
    digests = {run.output.name: hashlib.sha256(run.output.read_bytes()).hexdigest()}
    for path in sorted(p for p in figures.rglob("*") if p.is_file()):  # keyed relative: a moved checkout re-runs nothing
        digests[f"output_dir/{path.relative_to(figures)}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


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
    Path(run.parameters["output_dir"]).mkdir(parents=True, exist_ok=True)
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
    record = {"key": run.key, "notebook": run.notebook.path.name, "parameters": run.parameters,
              "seconds": round(time.perf_counter() - start, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "outputs": _output_digests(run)}
    run.record.write_text(json.dumps(record, indent=1) + "\n")
    return None


def _source_cell_index(path: Path, source: str) -> int | None:
    """Index of the cell with this source in the notebook as written (papermill's index counts its injected cell)."""
    import nbformat

    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.source == source:
            return index
    return None


def _python_path_with_this_lllm() -> str:
    """PYTHONPATH with the directory holding this lllm package first."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))


@contextmanager
def _kernel_environment(threads: int | None = None) -> Iterator[None]:
    """Environment of the notebook kernels (they inherit it): this lllm importable, no progress bars.

    PYTHONPATH gets this lllm's parent directory, so that kernels import the lllm that runs the
    driver even from an uninstalled checkout. TQDM_DISABLE turns off every tqdm bar (lllm's and
    transformers' GGUF loading): in an executed notebook they are only hundreds of stderr lines.
    The warning filter silences tqdm.auto's "IProgress not found" on import in a kernel without
    ipywidgets, which a static offline book could not display anyway. `threads` sets the kernels'
    OpenMP threads (torch's intra-op threads), so that concurrent kernels share the cores.
    """
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found:Warning"]))
    overrides = {"PYTHONPATH": _python_path_with_this_lllm(), "TQDM_DISABLE": "1", "PYTHONWARNINGS": warnings}
    if threads is not None:  # the cores divided among the kernels that run at once
        overrides.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
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
    # Per-model runs first, interleaved by model so that concurrent ones rarely wait for the same analysis
    # (the results cache lets one compute it and the other read it); the all-models runs read their results.
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


def _execute_stage(runs: Sequence[Run], jobs: int, bar) -> Iterator[tuple[Run, Failure | None]]:
    """(run, failure or None) for each run, executed in this process or in a pool of `jobs` processes."""
    if jobs <= 1 or len(runs) <= 1:
        for run in runs:
            bar.set_postfix_str(run.label, refresh=True)
            yield run, execute_measured(run)
            bar.update()
        return
    # processes, not threads: papermill chdirs into the notebook's directory, which is process-wide
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(execute_measured, run): run for run in runs}
        bar.set_postfix_str(f"{len(runs)} queued on {jobs} processes", refresh=True)
        for future in as_completed(futures):
            run = futures[future]
            bar.set_postfix_str(f"done {run.label}", refresh=True)
            yield run, future.result()
            bar.update()


# ---------------------------------------------------------------------------------------------
# Table of contents and build
# ---------------------------------------------------------------------------------------------


def chapter_page(spec: NotebookSpec, runs: Sequence[Run], failures: Sequence[Failure], prompt: str, dtype: str,
                 fast: bool) -> str:
    """The markdown of a chapter's page: title, the notebook's own summary, and what was run for it."""
    shown = [r.model or "all models" for r in runs]
    config = f"prompt `{prompt}`, {dtype}" + (", fast configuration (fewer layers and tokens)" if fast else "")
    lines = [f"# {spec.title}", ""]
    if spec.summary:
        lines += [spec.summary, ""]
    lines.append(f"Notebook `{spec.path.name}`, executed by `lllm book` with {config}.")
    if shown:
        lines.append(f"Each section of this chapter is the executed notebook for one model: {', '.join(shown)}.")
    if failures:
        lines += ["", "```{warning}", "These runs failed and are not shown:", ""]
        lines += [f"- {f.model or 'all models'}: {f.error.splitlines()[0] if f.error else ''}"
                  + ("" if f.cell_index is None else f" (cell {f.cell_index})") for f in failures]
        lines.append("```")
    return "\n".join(lines) + "\n"


def write_toc(
    book_dir: Path, specs: Sequence[NotebookSpec], runs: Sequence[Run], failures: Sequence[Failure], prompt: str,
    dtype: str, fast: bool,
) -> Path:
    """Write <book>/_toc.yml (and the chapter pages) for the runs of this configuration; the toc's path."""
    import yaml

    book_dir = Path(book_dir).resolve()
    failed = {(f.chapter, f.model) for f in failures}
    chapters = []
    for spec in specs:
        chapter_runs = [r for r in runs if r.notebook.chapter == spec.chapter]
        if not chapter_runs:
            continue  # not run in this configuration: no page, no reference
        shown = [r for r in chapter_runs if (spec.chapter, r.model) not in failed]
        chapter_failures = [f for f in failures if f.chapter == spec.chapter]
        page = book_dir / "generated" / "chapters" / f"{spec.chapter}.md"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(chapter_page(spec, shown, chapter_failures, prompt, dtype, fast))
        entry = {"file": _rel(page, book_dir)}
        if shown:
            entry["sections"] = [{"file": _rel(r.output, book_dir), "title": r.model or "All models"} for r in shown]
        chapters.append(entry)
    parts = [
        {"caption": "Background", "chapters": [{"file": p} for p in INTRO_PAGES[1:] if (book_dir / p).exists()]},
        {"caption": "Figures", "chapters": chapters},
        {"caption": "Discussion", "chapters": [{"file": p} for p in _discussion_pages(book_dir)]},
        {"caption": "Using lllm", "chapters": [{"file": p} for p in REFERENCE_PAGES if (book_dir / p).exists()]},
    ]
    toc = {"format": "jb-book", "root": INTRO_PAGES[0], "parts": [p for p in parts if p["chapters"]]}
    path = book_dir / "_toc.yml"
    header = "# Written by `lllm book` from the notebooks run in its last configuration; do not edit.\n"
    path.write_text(header + yaml.safe_dump(toc, sort_keys=False, allow_unicode=True))
    return path


def _discussion_pages(book_dir: Path) -> list[str]:
    """pages/*.md: those in PAGE_ORDER first, in that order, then the others alphabetically."""
    present = {p.name for p in (book_dir / PAGES_DIR).glob("*.md") if p.name != "README.md"}
    ordered = [name for name in PAGE_ORDER if name in present] + sorted(present - set(PAGE_ORDER))
    return [f"{PAGES_DIR}/{name}" for name in ordered]


def _rel(path: Path, root: Path) -> str:
    """`path` relative to `root`, with forward slashes, as _toc.yml wants it."""
    return path.resolve().relative_to(root).as_posix()


def build_html(book_dir: Path) -> tuple[bool, float, Path, list[str]]:
    """Run `jupyter-book build <book> -W --keep-going`: (succeeded, seconds, log file, warning/error lines)."""
    book_dir = Path(book_dir).resolve()
    log = book_dir / "_build" / "lllm-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": _python_path_with_this_lllm()}  # autodoc imports this lllm
    command = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
               "build", str(book_dir), "-W", "--keep-going"]
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seconds = time.perf_counter() - start
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)  # Sphinx colours its messages
    log.write_text(output)
    problems = [line for line in output.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
    ok = result.returncode == 0 and (book_dir / "_build" / "html" / "index.html").exists()
    if not ok and not problems:
        problems = output.splitlines()[-15:]
    return ok, seconds, log, problems


def build_book(
    models: Sequence[str] | None = None,
    prompt: str | None = None,
    *,
    notebooks_dir: str | os.PathLike = "notebooks",
    book_dir: str | os.PathLike = "book",
    dtype: str = "float32",
    fast: bool = False,
    only: Sequence[str] | None = None,
    jobs: int = 1,
    build: bool = True,
    force: bool = False,
    progress: bool = True,
) -> BookReport:
    """Run every notebook × model (skipping unchanged ones), write _toc.yml, and build the book.

    models/prompt default to DEFAULT_MODELS/DEFAULT_PROMPT, or to FAST_MODELS/FAST_PROMPT when `fast`.
    Failures are collected in the report, never raised; the book is built from the runs that succeeded.
    """
    models = list(models or (FAST_MODELS if fast else DEFAULT_MODELS))
    prompt = prompt if prompt is not None else (FAST_PROMPT if fast else DEFAULT_PROMPT)
    if not prompt.strip():
        raise PromptError("the prompt is empty; give at least one token of text")
    if dtype not in DTYPES:
        raise BookBuildError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")
    check_int(jobs, "jobs", minimum=1)
    empty = [m for m in models if not isinstance(m, str) or not m.strip()]
    if empty:  # the notebooks resolve the names (a test book uses its own); only an empty one is wrong here
        raise BookBuildError(f"model names must be non-empty strings, got {empty}")
    slugs = [model_slug(m) for m in models]
    if len(set(slugs)) != len(slugs):
        raise BookBuildError(f"models {models} do not have distinct output names ({slugs}); name each once")
    book_dir = Path(book_dir).resolve()
    if not (book_dir / "_config.yml").exists():
        raise BookBuildError(f"{book_dir} has no _config.yml; pass the book directory with --book-dir")
    specs = select(discover(Path(notebooks_dir)), only)
    runs = plan(specs, models, prompt, dtype, fast, book_dir, code_fingerprint())
    report = execute_all(runs, jobs=jobs, force=force, progress=progress)
    report.toc = write_toc(book_dir, specs, runs, report.failures, prompt, dtype, fast)
    if build:
        report.built, report.build_seconds, report.build_log, problems = build_html(book_dir)
        if report.built:
            report.html = book_dir / "_build" / "html" / "index.html"
        else:
            report.build_errors = problems
    report.write(book_dir / "_build" / "build-report.json")
    return report


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def default_jobs() -> int:
    """Notebooks run at once by default: one per core (each kernel then gets one torch thread)."""
    return max(1, os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lllm book`."""
    parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help=f"embedded short name, hub id or local path; repeat for several "
                             f"(default: {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--prompt", help=f"the prompt every notebook analyses (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype the models run in (default: float32)")
    parser.add_argument("--fast", action="store_true",
                        help=f"CI configuration: {', '.join(FAST_MODELS)} only, prompt {FAST_PROMPT!r}, notebooks "
                             "get fast=True (fewer layers and tokens)")
    parser.add_argument("--only", action="append", metavar="CHAPTER",
                        help="run only this chapter (or notebook name); repeat for several")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="notebooks executed at once, the cores divided among them (default: the number of "
                             f"cores, {default_jobs()} here)")
    parser.add_argument("--force", action="store_true", help="re-execute notebooks even if their inputs are unchanged")
    parser.add_argument("--no-build", dest="build", action="store_false",
                        help="execute the notebooks and write _toc.yml, but do not build the HTML")
    parser.add_argument("--notebooks-dir", default="notebooks", help="directory of the paper notebooks")
    parser.add_argument("--book-dir", default="book", help="the Jupyter Book directory")


def run(args: argparse.Namespace) -> int:
    """`lllm book`: build, print the report, and return 1 if any notebook or the build failed."""
    report = build_book(
        args.models, args.prompt, notebooks_dir=args.notebooks_dir, book_dir=args.book_dir, dtype=args.dtype,
        fast=args.fast, only=args.only, jobs=args.jobs, build=args.build, force=args.force,
    )
    print(report.summary())
    return 0 if report.ok else 1
