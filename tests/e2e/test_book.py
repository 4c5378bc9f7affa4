"""`lllm book` on the test notebooks (tests/tiny_book.py): failure report, outputs, skip logic, _toc.yml and the
-W build. The book is built once per session (fixture `built_book`); test_browser.py looks at the same build.
tests/unit/test_book.py has the driver's checks and plans that run no notebook.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil

import nbformat
import yaml
from nbformat.v4 import new_markdown_cell
from tiny_book import FINGERPRINT, MODEL, PROMPT, REPO, TEST_NOTEBOOKS

from lllm.apps.book import build_book, site
from lllm.apps.book import cli as book_cli


def test_a_failure_names_notebook_model_cell_and_exception(built_book):
    report = built_book["report"]
    assert not report.ok
    assert len(report.failures) == 1
    failure = report.failures[0]
    assert (failure.notebook, failure.chapter, failure.model) == ("broken.ipynb", "broken", MODEL)
    # cell 3 of the notebook as written; papermill's own index would count its injected cell too
    assert failure.cell_index == 3
    assert failure.execution_count is not None
    assert failure.cell_source == "raise ValueError(f'known failure for {model}')"
    assert failure.error == f"ValueError: known failure for {MODEL}"
    assert failure.output.exists()  # the executed notebook keeps the traceback for inspection
    text = report.summary()
    assert "broken.ipynb × tiny: cell 3" in text and "ValueError: known failure for tiny" in text


def test_the_other_notebooks_ran_and_wrote_their_outputs(built_book):
    report, book_dir = built_book["report"], built_book["book_dir"]
    assert sorted(run.label for run in report.executed) == ["compare × all models", "tiny-figure × tiny"]
    executed = nbformat.read(book_dir / "generated" / "tiny-figure" / "tiny.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'model = "tiny"' in injected[0].source and "fast = False" in injected[0].source
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    printed = "".join(o.get("text", "") for o in outputs)
    detached = float(re.search(r"detached: relative error (\S+)", printed).group(1))
    ordinary = float(re.search(r"ordinary: relative error (\S+)", printed).group(1))
    assert detached < 1e-4 < ordinary  # the figure's content is the real computation, not a placeholder
    assert (book_dir / "generated" / "figures" / "tiny-figure" / "tiny" / "reconstruction.png").stat().st_size > 0
    compared = nbformat.read(book_dir / "generated" / "compare" / "all-models.ipynb", as_version=4)
    assert 'models = ["tiny"]' in "".join(c.source for c in compared.cells)
    record = json.loads((book_dir / "generated" / "tiny-figure" / "tiny.run.json").read_text())
    assert record["parameters"]["prompt"] == PROMPT
    assert not (book_dir / "generated" / "broken" / "tiny.run.json").exists()  # failures are never "unchanged"


def test_the_build_report_says_where_the_time_went(built_book):
    report = json.loads((built_book["book_dir"] / "_build" / "build-report.json").read_text())
    runs = {(r["chapter"], r["model"]): r for r in report["runs"]}
    figure = runs[("tiny-figure", "tiny")]
    assert figure["outcome"] == "executed" and figure["seconds"] > 0
    assert figure["peak_rss_mb"] > 50  # the kernel's memory (python, torch, a model), sampled while it ran
    assert runs[("broken", "tiny")]["outcome"] == "failed"
    assert report["build"]["built"] is True and report["build"]["seconds"] > 0
    table = built_book["report"].table()
    assert "tiny-figure" in table and "total" in table.splitlines()[-1]


def test_toc_lists_what_ran_in_book_order(built_book):
    from sphinx_external_toc.parsing import parse_toc_yaml

    book_dir = built_book["book_dir"]
    toc_path = book_dir / "toc-of-first-run.yml"
    toc_path.write_text(built_book["toc"])
    site_map = parse_toc_yaml(toc_path)  # raises on an invalid structure
    assert site_map.root.docname == "intro.md"
    for docname in site_map:
        assert (book_dir / docname).exists(), docname
    data = yaml.safe_load(built_book["toc"])
    captions = [part["caption"] for part in data["parts"]]
    discussion = ["Discussion"] if any((book_dir / "pages").glob("*.md")) else []  # a part is never empty
    assert captions == ["Background", "Figures and tables of the paper", "Beyond the paper", *discussion, "Using lllm"]
    figures, beyond = data["parts"][1]["chapters"], data["parts"][2]["chapters"]  # by the notebooks' "part"
    assert [c["file"] for c in figures] == ["generated/chapters/tiny-figure.md", "generated/chapters/broken.md"]
    assert [c["file"] for c in beyond] == ["generated/chapters/compare.md"]
    assert figures[0]["sections"] == [{"file": "generated/tiny-figure/tiny.ipynb", "title": "tiny"}]
    assert "sections" not in figures[1]  # the failed run is not shown ...
    broken_page = (book_dir / "generated" / "chapters" / "broken.md").read_text()
    assert "These runs failed" in broken_page and "known failure for tiny" in broken_page  # ... but said
    assert beyond[0]["sections"] == [{"file": "generated/compare/all-models.ipynb", "title": "All models"}]


def test_book_builds_with_warnings_as_errors_and_local_mathjax(built_book):
    report, book_dir = built_book["report"], built_book["book_dir"]
    assert report.built, "\n".join(report.build_errors)
    html = book_dir / "_build" / "html"
    assert report.html == html / "index.html"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").stat().st_size > 0
    assert '<script defer="defer" src="_static/mathjax/tex-chtml.js"></script>' in (html / "method.html").read_text()
    for page in html.rglob("*.html"):
        text = page.read_text()
        sources = re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="([^"]+)"', text)
        remote = [s for s in sources if re.match(r"(https?:)?//", s)]
        assert not remote, f"{page} loads {remote}"
        assert "unpkg.com" not in text and "cdn.jsdelivr" not in text, page
    api = (html / "api.html").read_text()
    assert 'id="lllm.kernel.jacobian.detached_jacobian"' in api and 'id="lllm.apps.book.site.build_book"' in api
    assert "generated/broken/tiny" not in (html / "generated" / "chapters" / "broken.html").read_text()


def test_unchanged_inputs_are_not_executed_again(built_book, monkeypatch):
    book_dir, notebooks = built_book["book_dir"], built_book["notebooks"]
    monkeypatch.setattr(site, "code_fingerprint", lambda: FINGERPRINT)
    again = build_book([MODEL], PROMPT, notebooks_dir=notebooks, book_dir=book_dir, build=False, progress=False)
    assert again.executed == []
    assert sorted(run.label for run in again.skipped) == ["compare × all models", "tiny-figure × tiny"]
    assert [f.notebook for f in again.failures] == ["broken.ipynb"]  # a failed run is retried
    # editing a notebook re-runs that notebook only
    nb = nbformat.read(notebooks / "compare.ipynb", as_version=4)
    nb.cells.append(new_markdown_cell("An edit."))
    nbformat.write(nb, notebooks / "compare.ipynb")
    edited = build_book([MODEL], PROMPT, notebooks_dir=notebooks, book_dir=book_dir, build=False, progress=False,
                        only=["compare", "tiny_figure"])
    assert [run.label for run in edited.executed] == ["compare × all models"]
    assert [run.label for run in edited.skipped] == ["tiny-figure × tiny"]


def test_a_damaged_output_is_executed_again(built_book, monkeypatch):
    """The executed notebook and its figures are derived files: one flipped byte in any of them re-runs it."""
    book_dir, notebooks = built_book["book_dir"], built_book["notebooks"]
    monkeypatch.setattr(site, "code_fingerprint", lambda: FINGERPRINT)
    figures = sorted(p for p in (book_dir / "generated").rglob("*") if p.is_file() and "tiny" in p.parts
                     and p.suffix != ".json" and "figures" in p.parts)
    assert figures, "the tiny figure notebook wrote no file to check"
    damaged = figures[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    again = build_book([MODEL], PROMPT, notebooks_dir=notebooks, book_dir=book_dir, build=False, progress=False,
                       only=["tiny_figure"])
    assert [run.label for run in again.executed] == ["tiny-figure × tiny"]
    assert bytes(data) != damaged.read_bytes()  # written again by the run


def test_cli_exits_non_zero_and_reports_the_cell(tmp_path, capsys):
    book_dir = tmp_path / "book"
    book_dir.mkdir()
    shutil.copy(REPO / "book" / "_config.yml", book_dir)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(TEST_NOTEBOOKS / "broken.ipynb", notebooks)
    parser = argparse.ArgumentParser(prog="lllm book")
    book_cli.add_arguments(parser)
    args = parser.parse_args(["--model", "other-model", "--prompt", "1 2", "--notebooks-dir", str(notebooks),
                              "--book-dir", str(book_dir), "--no-build"])
    assert book_cli.run(args) == 1
    out = capsys.readouterr().out
    assert "broken.ipynb × other-model: cell 3" in out and "ValueError: known failure for other-model" in out
    assert (book_dir / "generated" / "broken" / "other-model.ipynb").exists()
