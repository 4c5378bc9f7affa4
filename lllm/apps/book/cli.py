"""The `lllm book` command."""

from __future__ import annotations

import argparse
import os

from lllm.defaults import DEFAULT_PROMPT, DTYPES

from lllm.apps.book.notebooks import (
    DEFAULT_MODELS, FAST_MODELS, FAST_PROMPT,
)
from lllm.apps.book.site import build_book


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
