"""The paper notebooks' contract with `lllm book`, read from the files (tests/e2e/test_notebooks.py runs them)."""

from __future__ import annotations

import re
import ast
from pathlib import Path

import nbformat
import pytest

from lllm.apps.book import SCOPES, discover

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
COMMON_PARAMETERS = {"prompt", "dtype", "output_dir", "fast"}
SCOPE_PARAMETERS = {"per_model": {"model"}, "all_models": {"models"}}
# figa1 is about one model (DeepSeek-R1's Qwen 3 distill), not the book's list: it runs once, on `model`.
OWN_MODEL = {"figa1"}
SPECS = {spec.chapter: spec for spec in discover(NOTEBOOKS)}


def parameter_names(nb) -> set[str]:
    """Names assigned in the notebook's `parameters` cell."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {target.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


@pytest.mark.parametrize("chapter", sorted(SPECS))
def test_notebook_metadata_and_parameters(chapter):
    spec = SPECS[chapter]
    nb = nbformat.read(spec.path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert spec.scope in SCOPES and spec.title and spec.summary, "the chapter page needs a title and a summary"
    names = parameter_names(nb)
    required = COMMON_PARAMETERS | ({"model"} if chapter in OWN_MODEL else SCOPE_PARAMETERS[spec.scope])
    assert required <= names, f"{spec.path.name}: parameters cell lacks {required - names}"
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with what its figure shows"
    stored = [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stored, f"{spec.path.name} is committed with outputs; the book driver executes it"


PAPER = NOTEBOOKS.parents[1] / "shared" / "paper.txt"  # the paper's text, beside the checkout where it is kept
FIGURE_PAGES = {"fig2", "fig3", "fig4", "fig5", "fig6", "tables1_3", "table4"}


def test_every_figure_and_table_page_says_what_the_paper_shows():
    assert {c for c, spec in SPECS.items() if spec.paper is not None} >= FIGURE_PAGES


@pytest.mark.skipif(not PAPER.exists(), reason=f"the paper's text is not at {PAPER}")
@pytest.mark.parametrize("chapter", sorted(FIGURE_PAGES))
def test_the_paper_is_quoted_verbatim(chapter):
    words = lambda text: " ".join(text.split())  # noqa: E731  (line breaks and double spaces do not count)
    where, quote = SPECS[chapter].paper
    assert words(quote) in words(PAPER.read_text()), f"{chapter}: {quote!r} is not the paper's wording"
    assert _where_in_paper(quote) == where, chapter


@pytest.mark.skipif(not PAPER.exists(), reason=f"the paper's text is not at {PAPER}")
def test_every_claim_of_paper_vs_book_quotes_the_paper_verbatim():
    from lllm.apps.claims import CLAIMS

    words = lambda text: " ".join(text.split())  # noqa: E731  (line breaks and double spaces do not count)
    paper = words(PAPER.read_text())
    for claim in CLAIMS:
        assert words(claim.quote) in paper, f"{claim.name}: {claim.quote!r} is not the paper's wording"
        assert claim.where.startswith(("Fig. ", "Table ", "Sec. ", "Abstract"))


def _where_in_paper(quote: str) -> str:
    """Where the paper says `quote`: 'Fig. N' in a figure's caption, else 'Sec. X.Y' (or 'Abstract') under the last
    heading above it."""
    words = lambda text: " ".join(text.split())  # noqa: E731
    lines = PAPER.read_text().splitlines()
    found = [i for i, line in enumerate(lines) if words(quote) in words(line)]
    assert len(found) == 1, f"{quote!r} is on {len(found)} lines of the paper, expected one"
    caption = re.match(r"Figure (\w+)\.", lines[found[0]])
    if caption:
        return f"Fig. {caption.group(1)}"
    for line in reversed(lines[:found[0]]):
        heading = re.match(r"#+ (?:(\d+\.\d+)\.|(Abstract))", line)
        if heading:
            return f"Sec. {heading.group(1)}" if heading.group(1) else "Abstract"
    raise AssertionError(f"no heading above {quote!r}")


@pytest.mark.skipif(not PAPER.exists(), reason=f"the paper's text is not at {PAPER}")
def test_every_claim_says_where_the_paper_says_it():
    from lllm.apps.claims import CLAIMS

    for claim in CLAIMS:
        assert _where_in_paper(claim.quote) == claim.where, claim.name
