"""The test book: `lllm book` on the three notebooks of tests/data/notebooks (one draws a tiny-model figure, one
fails in a known cell, one takes all models), in a temporary copy of book/ (its static pages and config).

tests/e2e/conftest.py builds it once per session (fixture `built_book`) for tests/e2e/test_book.py and
tests/e2e/test_browser.py; tests/unit/test_book.py plans runs of the same notebooks without running them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_NOTEBOOKS = REPO / "tests" / "data" / "notebooks"
MODEL, PROMPT = "tiny", "1 2 3 4 5"
# lllm's code fingerprint is a notebook input; other lllm modules may change while the tests run
# (in development), so the end-to-end runs use a fixed one and the fingerprint is tested on its own.
FINGERPRINT = "test-fingerprint"


def copy_book(destination: Path) -> Path:
    """A copy of the repository's book sources (config, pages, extension), without any build output."""
    return Path(shutil.copytree(REPO / "book", destination,
                                ignore=shutil.ignore_patterns("_build", "generated", "_toc.yml")))


def build_tiny_book(root: Path, monkeypatch) -> dict:
    """Run the driver on the test notebooks and build the book under `root`: book_dir, notebooks, the report and
    the _toc.yml the run wrote."""
    from lllm.apps.book import site

    book_dir = copy_book(root / "book")
    notebooks = Path(shutil.copytree(TEST_NOTEBOOKS, root / "notebooks"))
    monkeypatch.setattr(site, "code_fingerprint", lambda: FINGERPRINT)  # what build_book calls
    report = site.build_book([MODEL], PROMPT, notebooks_dir=notebooks, book_dir=book_dir, progress=False)
    print(f"\ntest book: notebooks ran in {report.run_seconds:.1f} s, jupyter-book build took "
          f"{report.build_seconds:.1f} s")
    return dict(book_dir=book_dir, notebooks=notebooks, report=report, toc=(book_dir / "_toc.yml").read_text())
