"""The Jupyter Book around the executed notebooks: chapter pages, the table of contents, and `jupyter-book build`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lllm.errors import BookBuildError, PromptError
from lllm.defaults import DEFAULT_PROMPT, DTYPES
from lllm.validation import check_int

from lllm.apps.book.notebooks import (
    DEFAULT_MODELS, FAST_MODELS, FAST_PROMPT, INTRO_PAGES, PAGE_ORDER, PAGES_DIR, PARTS, REFERENCE_PAGES, NotebookSpec,
    discover, model_slug, select,
)
from lllm.apps.book.runs import Failure, Run, code_fingerprint, plan
from lllm.apps.book.execute import BookReport, execute_all, python_path_with_this_lllm
from lllm.apps.book.headline import write_headline


def chapter_page(spec: NotebookSpec, runs: Sequence[Run], failures: Sequence[Failure], prompt: str, dtype: str,
                 fast: bool) -> str:
    """The markdown of a chapter's page: title, the notebook's own summary, and what was run for it."""
    shown = [r.model or "all models" for r in runs]
    config = f"prompt `{prompt}`, {dtype}" + (", fast configuration (fewer layers and tokens)" if fast else "")
    lines = [f"# {spec.title}", ""]
    if spec.paper is not None:  # what the paper shows comes first, in its own words
        where, quote = spec.paper
        lines += [f"**What the paper shows** ({where}):", "", f"> {' '.join(quote.split())}", ""]
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
    chapters: dict[str, list] = {part: [] for part in PARTS}
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
        chapters[spec.part].append(entry)
    parts = [
        {"caption": "Background", "chapters": [{"file": p} for p in INTRO_PAGES[1:] if (book_dir / p).exists()]},
        *({"caption": caption, "chapters": chapters[part]} for part, caption in PARTS.items()),
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
    env = {**os.environ, "PYTHONPATH": python_path_with_this_lllm()}  # autodoc imports this lllm
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
    failed = {(f.chapter, f.model) for f in report.failures}
    write_headline(book_dir, [r.figures for r in runs if (r.notebook.chapter, r.model) not in failed])
    if build:
        report.built, report.build_seconds, report.build_log, problems = build_html(book_dir)
        if report.built:
            report.html = book_dir / "_build" / "html" / "index.html"
        else:
            report.build_errors = problems
    report.write(book_dir / "_build" / "build-report.json")
    return report
