"""`lllm book` on test notebooks: failure report, outputs, skip logic, _toc.yml and the -W build.

The driver runs on a temporary copy of book/ (its static pages and config) with the three notebooks
of tests/data/notebooks: one that draws a tiny-model figure, one that fails in a known cell, and
one all-models notebook. The book is built once per session (see `built_book`), and
tests/test_browser.py looks at the same build.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import lllm
from lllm.apps import book
from lllm.errors import PromptError
from lllm.apps.book import BookBuildError, NotebookMetadataError, build_book, discover, model_slug, plan

REPO = Path(__file__).resolve().parents[1]
TEST_NOTEBOOKS = Path(__file__).resolve().parent / "data" / "notebooks"
MODEL, PROMPT = "tiny", "1 2 3 4 5"
_BUILT: dict = {}  # one build per session, shared with test_browser.py
# lllm's code fingerprint is a notebook input; other lllm modules may change while the tests run
# (in development), so the end-to-end runs use a fixed one and the fingerprint is tested on its own.
FINGERPRINT = "test-fingerprint"


def copy_book(destination: Path) -> Path:
    """A copy of the repository's book sources (config, pages, extension), without any build output."""
    return Path(shutil.copytree(REPO / "book", destination,
                                ignore=shutil.ignore_patterns("_build", "generated", "_toc.yml")))


def built_book(root: Path) -> dict:
    """Run the driver once (per session) on the test notebooks and build the book under `root`."""
    if not _BUILT:
        book_dir = copy_book(root / "book")
        notebooks = Path(shutil.copytree(TEST_NOTEBOOKS, root / "notebooks"))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(book, "code_fingerprint", lambda: FINGERPRINT)
            report = build_book([MODEL], PROMPT, notebooks_dir=notebooks, book_dir=book_dir, progress=False)
        print(f"\ntest book: notebooks ran in {report.run_seconds:.1f} s, jupyter-book build took "
              f"{report.build_seconds:.1f} s")
        _BUILT.update(book_dir=book_dir, notebooks=notebooks, report=report, toc=(book_dir / "_toc.yml").read_text())
    return _BUILT


@pytest.fixture(scope="module")
def session_book(tmp_path_factory) -> dict:
    return built_book(tmp_path_factory.mktemp("lllm-book"))


def write_notebook(path: Path, metadata: dict | None, parameters: bool = True) -> Path:
    """A one-cell notebook with the given `lllm` metadata (None: none) and optionally a parameters cell."""
    cells = [new_markdown_cell("# A notebook")]
    if parameters:
        cells.append(new_code_cell('model = "x"'))
        cells[-1].metadata["tags"] = ["parameters"]
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    if metadata is not None:
        meta["lllm"] = metadata
    nbformat.write(new_notebook(cells=cells, metadata=meta), path)
    return path


def test_a_failure_names_notebook_model_cell_and_exception(session_book):
    report = session_book["report"]
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


def test_the_other_notebooks_ran_and_wrote_their_outputs(session_book):
    report, book_dir = session_book["report"], session_book["book_dir"]
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


def test_the_build_report_says_where_the_time_went(session_book):
    report = json.loads((session_book["book_dir"] / "_build" / "build-report.json").read_text())
    runs = {(r["chapter"], r["model"]): r for r in report["runs"]}
    figure = runs[("tiny-figure", "tiny")]
    assert figure["outcome"] == "executed" and figure["seconds"] > 0
    assert figure["peak_rss_mb"] > 50  # the kernel's memory (python, torch, a model), sampled while it ran
    assert runs[("broken", "tiny")]["outcome"] == "failed"
    assert report["build"]["built"] is True and report["build"]["seconds"] > 0
    table = session_book["report"].table()
    assert "tiny-figure" in table and "total" in table.splitlines()[-1]


def test_toc_lists_what_ran_in_book_order(session_book):
    from sphinx_external_toc.parsing import parse_toc_yaml

    book_dir = session_book["book_dir"]
    toc_path = book_dir / "toc-of-first-run.yml"
    toc_path.write_text(session_book["toc"])
    site_map = parse_toc_yaml(toc_path)  # raises on an invalid structure
    assert site_map.root.docname == "intro.md"
    for docname in site_map:
        assert (book_dir / docname).exists(), docname
    data = yaml.safe_load(session_book["toc"])
    captions = [part["caption"] for part in data["parts"]]
    discussion = ["Discussion"] if any((book_dir / "pages").glob("*.md")) else []  # a part is never empty
    assert captions == ["Background", "Figures", *discussion, "Using lllm"]
    figures = data["parts"][1]["chapters"]
    assert [c["file"] for c in figures] == [
        "generated/chapters/tiny-figure.md", "generated/chapters/broken.md", "generated/chapters/compare.md"]
    assert figures[0]["sections"] == [{"file": "generated/tiny-figure/tiny.ipynb", "title": "tiny"}]
    assert "sections" not in figures[1]  # the failed run is not shown ...
    broken_page = (book_dir / "generated" / "chapters" / "broken.md").read_text()
    assert "These runs failed" in broken_page and "known failure for tiny" in broken_page  # ... but said
    assert figures[2]["sections"] == [{"file": "generated/compare/all-models.ipynb", "title": "All models"}]


def test_book_builds_with_warnings_as_errors_and_local_mathjax(session_book):
    report, book_dir = session_book["report"], session_book["book_dir"]
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
    assert 'id="lllm.kernel.jacobian.detached_jacobian"' in api and 'id="lllm.apps.book.build_book"' in api
    assert "generated/broken/tiny" not in (html / "generated" / "chapters" / "broken.html").read_text()


def test_unchanged_inputs_are_not_executed_again(session_book, monkeypatch):
    book_dir, notebooks = session_book["book_dir"], session_book["notebooks"]
    monkeypatch.setattr(book, "code_fingerprint", lambda: FINGERPRINT)
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


def test_a_damaged_output_is_executed_again(session_book, monkeypatch):
    """The executed notebook and its figures are derived files: one flipped byte in any of them re-runs it."""
    book_dir, notebooks = session_book["book_dir"], session_book["notebooks"]
    monkeypatch.setattr(book, "code_fingerprint", lambda: FINGERPRINT)
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


def test_a_change_in_a_declared_data_file_reruns_only_its_notebook(tmp_path):
    notebooks, data = tmp_path / "notebooks", tmp_path / "data"
    notebooks.mkdir(), data.mkdir()
    (data / "sweep-a.parquet").write_bytes(b"first")
    write_notebook(notebooks / "reader.ipynb", {"chapter": "reader", "title": "R", "order": 1, "scope": "all_models",
                                                "reads": ["../data/sweep-*.parquet"]})
    write_notebook(notebooks / "other.ipynb", {"chapter": "other", "title": "O", "order": 2, "scope": "all_models"})
    keys = lambda: {run.notebook.chapter: run.key for run in plan(  # noqa: E731
        discover(notebooks), [MODEL], PROMPT, "float32", False, tmp_path / "book", FINGERPRINT)}
    before = keys()
    (data / "sweep-a.parquet").write_bytes(b"second")
    changed = keys()
    (data / "sweep-b.parquet").write_bytes(b"new")
    added = keys()
    assert changed["reader"] != before["reader"] != added["reader"] != changed["reader"]
    assert before["other"] == changed["other"] == added["other"]
    write_notebook(notebooks / "bad.ipynb", {"chapter": "bad", "title": "B", "order": 3, "scope": "all_models",
                                             "reads": "../data"})
    with pytest.raises(NotebookMetadataError, match="glob patterns"):
        discover(notebooks)


def test_an_all_models_notebook_gets_the_model_list_only_if_it_declares_it(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    meta = {"title": "T", "order": 1, "scope": "all_models"}
    write_notebook(notebooks / "own.ipynb", {"chapter": "own", **meta})  # declares `model` only
    path = write_notebook(notebooks / "list.ipynb", {"chapter": "list", **meta})
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = 'models = ["x"]\nprompt = "p"'
    nbformat.write(nb, path)
    runs = {run.notebook.chapter: run for run in plan(
        discover(notebooks), [MODEL, "other"], PROMPT, "float32", False, tmp_path / "book", FINGERPRINT)}
    assert runs["list"].parameters["models"] == [MODEL, "other"]
    assert "models" not in runs["own"].parameters and "model" not in runs["own"].parameters


def test_cli_exits_non_zero_and_reports_the_cell(tmp_path, capsys):
    book_dir = tmp_path / "book"
    book_dir.mkdir()
    shutil.copy(REPO / "book" / "_config.yml", book_dir)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(TEST_NOTEBOOKS / "broken.ipynb", notebooks)
    parser = argparse.ArgumentParser(prog="lllm book")
    book.add_arguments(parser)
    args = parser.parse_args(["--model", "other-model", "--prompt", "1 2", "--notebooks-dir", str(notebooks),
                              "--book-dir", str(book_dir), "--no-build"])
    assert book.run(args) == 1
    out = capsys.readouterr().out
    assert "broken.ipynb × other-model: cell 3" in out and "ValueError: known failure for other-model" in out
    assert (book_dir / "generated" / "broken" / "other-model.ipynb").exists()


def test_discovery_refuses_notebooks_without_valid_metadata(tmp_path):
    good = {"chapter": "fig3", "title": "Figure 3", "order": 3, "scope": "per_model"}
    write_notebook(tmp_path / "a.ipynb", good)
    assert [s.chapter for s in discover(tmp_path)] == ["fig3"]
    cases = {
        "no lllm metadata": (None, True, "no 'lllm' entry"),
        "missing keys": ({"chapter": "x"}, True, "lacks ['title', 'order', 'scope']"),
        "bad scope": ({**good, "chapter": "y", "scope": "per_prompt"}, True, "scope 'per_prompt'"),
        "bad chapter": ({**good, "chapter": "Fig 3"}, True, "lowercase"),
        "no parameters cell": ({**good, "chapter": "z"}, False, "no cell tagged 'parameters'"),
        "duplicate chapter": (good, True, "both declare chapter 'fig3'"),
    }
    for name, (metadata, parameters, message) in cases.items():
        bad = write_notebook(tmp_path / "b.ipynb", metadata, parameters)
        with pytest.raises(NotebookMetadataError, match=re.escape(message)):
            discover(tmp_path)
        bad.unlink()
    (tmp_path / "c.ipynb").write_text("{not json")
    with pytest.raises(NotebookMetadataError, match="not a readable notebook"):
        discover(tmp_path)
    with pytest.raises(BookBuildError, match="does not exist"):
        discover(tmp_path / "missing")


def test_bad_options_are_refused_before_running_anything(tmp_path):
    (tmp_path / "book").mkdir()
    shutil.copy(REPO / "book" / "_config.yml", tmp_path / "book")
    options = dict(notebooks_dir=TEST_NOTEBOOKS, book_dir=tmp_path / "book", build=False, progress=False)
    with pytest.raises(BookBuildError, match="no notebook has chapter or name"):
        build_book([MODEL], PROMPT, only=["fig99"], **options)
    with pytest.raises(PromptError):
        build_book([MODEL], "  ", **options)
    with pytest.raises(BookBuildError, match="dtype"):
        build_book([MODEL], PROMPT, dtype="float8", **options)
    with pytest.raises(BookBuildError, match="distinct output names"):
        build_book(["Org/Model", "org--model"], PROMPT, **options)
    with pytest.raises(BookBuildError, match="no _config.yml"):
        build_book([MODEL], PROMPT, **{**options, "book_dir": tmp_path})
    assert not (tmp_path / "book" / "generated").exists()


def test_model_slugs_are_file_names_and_distinct(tmp_path):
    assert model_slug("smollm2-135m") == "smollm2-135m"
    assert model_slug("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert model_slug("HuggingFaceTB/SmolLM2-135M") == "huggingfacetb--smollm2-135m"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    first.write_bytes(b"")
    second.write_bytes(b"")
    assert model_slug(str(first)).startswith("model-") and model_slug(str(first)) != model_slug(str(second))
    with pytest.raises(BookBuildError):
        model_slug("+++")


def test_run_keys_depend_on_inputs_but_not_on_where_the_book_is(tmp_path):
    specs = discover(TEST_NOTEBOOKS)

    def keys(book_dir, prompt="1 2", fingerprint="v1", fast=False):
        return {r.label: r.key for r in plan(specs, ["m"], prompt, "float32", fast, book_dir, fingerprint)}

    base = keys(tmp_path / "one")
    assert base == keys(tmp_path / "elsewhere" / "two")
    for changed in (keys(tmp_path, prompt="1 3"), keys(tmp_path, fingerprint="v2"), keys(tmp_path, fast=True)):
        assert all(changed[label] != key for label, key in base.items())
    runs = plan(specs, ["m1", "m2"], "1 2", "float32", False, tmp_path, "v1")
    assert [r.label for r in runs][-1] == "compare × all models"  # after every per-model run
    assert runs[-1].parameters["models"] == ["m1", "m2"]


def test_code_fingerprint_covers_lllm_but_not_the_driver(monkeypatch):
    fingerprint = book.code_fingerprint()
    assert fingerprint.startswith(lllm.__version__ + "+") and fingerprint == book.code_fingerprint()
    monkeypatch.setattr(book, "_DRIVER_MODULES", ())  # now book.py and cli.py count as notebook inputs
    assert book.code_fingerprint() != fingerprint
