"""What a build runs: one run per notebook and model, its parameters and output paths, and whether its inputs
(notebook, parameters, lllm's code, the data it reads) are unchanged since its last success."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


from lllm.apps.book.notebooks import (
    ALL_MODELS_SLUG, DRIVER_MODULES, NotebookSpec, model_slug,
)


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
    def figures(self) -> Path:
        """Where the run writes its figure files: output_dir, which is relative to the notebook's directory."""
        return (self.notebook.path.parent / self.parameters["output_dir"]).resolve()

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


def code_fingerprint() -> str:
    """lllm's version and a hash of its source (minus the driver): a notebook re-runs when either changes."""
    from lllm import __version__

    digest = hashlib.sha256(__version__.encode())
    package = Path(__file__).resolve().parents[2]  # lllm/
    for source in sorted(package.rglob("*.py")):
        if str(source.relative_to(package).as_posix()).startswith(DRIVER_MODULES):
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
            # relative to the notebook's directory, where papermill runs it: no machine path on the rendered page
            parameters = {**own, **common, "output_dir": os.path.relpath(figures, spec.path.parent.resolve())}
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


def is_unchanged(run: Run) -> bool:
    """True when the output exists, was produced by a successful execution with the same key, and it and its
    figures still have the sha256 digests recorded then."""
    if not (run.output.exists() and run.record.exists()):
        return False
    try:
        record = json.loads(run.record.read_text())
        # the outputs are derived files too: one changed byte in the notebook or a figure re-runs it
        return record.get("key") == run.key and record.get("outputs") == output_digests(run)
    except (json.JSONDecodeError, OSError, AttributeError):
        return False  # a damaged record only costs a re-run


def output_digests(run: Run) -> dict[str, str]:
    """sha256 of the executed notebook and of every file its run wrote into its output directory."""
    figures = run.figures
    digests = {run.output.name: hashlib.sha256(run.output.read_bytes()).hexdigest()}
    for path in sorted(p for p in figures.rglob("*") if p.is_file()):  # keyed relative: a moved checkout re-runs nothing
        digests[f"output_dir/{path.relative_to(figures)}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests
