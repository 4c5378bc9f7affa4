"""The book's notebooks, found by their metadata: chapter, title, order and scope; and the defaults of a build."""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lllm.errors import BookBuildError, NotebookMetadataError



DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")


# The CI configuration: the smallest model and a two-token prompt; notebooks see fast=True.
FAST_MODELS = ("smollm2-135m",)


FAST_PROMPT = "The Golden"


PARTS = {"figures": "Figures and tables of the paper", "beyond": "Beyond the paper"}  # metadata "part" -> caption
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
    "lllm.io.models", "lllm.io.embedded", "lllm.io.store", "lllm.kernel.oplevel", "lllm.kernel.parts", "lllm.kernel.jacobian",
    "lllm.kernel.precision",
    "lllm.kernel.layers", "lllm.kernel.matfree", "lllm.analyses.decompose", "lllm.analyses.pipeline",
    "lllm.analyses.generation", "lllm.analyses.steering", "lllm.apps.sweep.engines", "lllm.apps.sweep.results",
    "lllm.apps.book.site", "lllm.errors",
)


# Modules that only drive notebooks and cannot change their results; editing them re-runs nothing.
DRIVER_MODULES = ("apps/book/", "apps/cli.py")  # relative to the package: the driver itself, whose edits re-run nothing


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
    shares: tuple[str, ...] = ()  # cached per-model computations other notebooks read too (e.g. "analysis")
    parameters: frozenset[str] = frozenset()  # names assigned in its `parameters` cell
    paper: tuple[str, str] | None = None  # (where, the paper's own words): what the paper shows for this page
    part: str = "figures"  # "figures": a figure or table of the paper; "beyond": what the book adds to it


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
    shares = meta.get("shares", [])
    if not (isinstance(shares, list) and all(isinstance(name, str) and name for name in shares)):
        raise NotebookMetadataError(f"{path}: 'shares' {shares!r} must be a list of names of cached computations")
    paper = meta.get("paper")
    if paper is not None and not (isinstance(paper, dict) and all(isinstance(paper.get(k), str) and paper[k]
                                                                  for k in ("where", "quote"))):
        raise NotebookMetadataError(f"{path}: 'paper' {paper!r} must be {{\"where\": \"Fig. 3\", \"quote\": "
                                    "\"the paper's own words\"}")
    part = meta.get("part", "figures")
    if part not in PARTS:
        raise NotebookMetadataError(f"{path}: part {part!r} is not one of {tuple(PARTS)}")
    summary = meta.get("summary") or _first_markdown_text(nb)
    return NotebookSpec(path=path.resolve(), chapter=chapter, title=str(meta["title"]), order=float(meta["order"]),
                        scope=scope, summary=summary, reads=tuple(reads), shares=tuple(shares), parameters=names,
                        paper=None if paper is None else (paper["where"], paper["quote"]), part=part)


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
