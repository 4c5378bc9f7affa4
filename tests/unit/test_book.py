"""`lllm book` without running a notebook: discovery and its metadata checks, run plans and their keys, model
slugs, the code fingerprint, options refused up front. tests/e2e/test_book.py runs and builds the test book."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from tiny_book import FINGERPRINT, MODEL, PROMPT, REPO, TEST_NOTEBOOKS

import lllm
from lllm.apps import book
from lllm.apps.book import runs as book_runs
from lllm.errors import PromptError
from lllm.apps.book import build_book, discover, model_slug
from lllm.apps.book.runs import plan
from lllm.errors import BookBuildError, NotebookMetadataError


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
    monkeypatch.setattr(book_runs, "DRIVER_MODULES", ())  # now the driver's modules count as notebook inputs
    assert book.code_fingerprint() != fingerprint


def test_a_chapter_page_opens_with_what_the_paper_shows(tmp_path):
    from lllm.apps.book.notebooks import NotebookSpec
    from lllm.apps.book.site import chapter_page

    spec = NotebookSpec(path=tmp_path / "fig9.ipynb", chapter="fig9", title="Figure 9: a test", order=9,
                        scope="per_model", summary="What this page computes.",
                        paper=("Fig. 9", "The  spectra are\n extremely low rank."))
    page = chapter_page(spec, [], [], "The Golden", "float32", False)
    assert page.index("> The spectra are extremely low rank.") < page.index("What this page computes.")
    assert "**What the paper shows** (Fig. 9)" in page
    plain = chapter_page(NotebookSpec(**{**spec.__dict__, "paper": None}), [], [], "The Golden", "float32", False)
    assert "What the paper shows" not in plain


def test_kernels_run_offline_where_the_hub_cannot_be_reached(monkeypatch):
    """No page of "Retrying in Ns": without a network the kernels get HF_HUB_OFFLINE=1, unless the user chose."""
    import os

    from lllm.apps.book.execute import _kernel_environment
    from lllm.io import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with _kernel_environment():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    with _kernel_environment():
        assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's choice stands
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with _kernel_environment():
        assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_runs_sharing_a_models_analysis_run_one_at_a_time_its_computer_first(tmp_path):
    from lllm.apps.book.execute import next_run

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for order, (chapter, shares) in enumerate([("gen", []), ("recon", ["analysis"]), ("spectra", ["analysis"])]):
        write_notebook(notebooks / f"{chapter}.ipynb", {"chapter": chapter, "title": chapter, "order": order,
                                                        "scope": "per_model", "shares": shares})
    runs = plan(discover(notebooks), ["a", "b"], PROMPT, "float32", False, tmp_path / "book", FINGERPRINT)
    by = {(run.notebook.chapter, run.model): run for run in runs}
    pending, done = list(runs), set()
    # the analyses' first readers (who compute them) first, one per model, then what shares nothing
    assert next_run(pending, [], done) is by["recon", "a"]
    assert next_run(pending, [by["recon", "a"]], done) is by["recon", "b"]
    assert next_run(pending, [by["recon", "a"], by["recon", "b"]], done) is by["gen", "a"]
    # while model a's analysis is computed, its other reader waits: model b's does not
    pending = [by["spectra", "a"], by["spectra", "b"]]
    assert next_run(pending, [by["recon", "a"]], {("b", "analysis")}) is by["spectra", "b"]
    assert next_run(pending[:1], [by["recon", "a"]], set()) is None
    assert next_run(pending[:1], [], {("a", "analysis")}) is by["spectra", "a"]
    # the larger model's first: its runs are the longest
    sized = plan(discover(notebooks), ["smollm2-135m", "qwen2.5-coder-0.5b"], PROMPT, "float32", False,
                 tmp_path / "book", FINGERPRINT)
    first = next_run(sized, [], set())
    assert (first.notebook.chapter, first.model) == ("recon", "qwen2.5-coder-0.5b")
    write_notebook(notebooks / "bad.ipynb", {"chapter": "bad", "title": "B", "order": 9, "scope": "per_model",
                                             "shares": "analysis"})
    with pytest.raises(NotebookMetadataError, match="cached computations"):
        discover(notebooks)
