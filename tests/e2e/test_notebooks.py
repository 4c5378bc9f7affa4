"""The paper notebooks, each one executing on SmolLM2 (tests/unit/test_notebooks.py checks their metadata).

Every notebook runs through papermill in the fast configuration (fast=True, the prompt "The Golden")
in one shared results cache (LLLM_CACHE_DIR, a session directory the kernels inherit through the
environment), so the per-prompt analysis is computed by the first notebook and read by the others.
Each run must write its PNG and SVG figures; the pages that depend on files made elsewhere (sweep
output, benchmark results, DeepSeek weights) must say plainly when those are missing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import matplotlib
import nbformat
import pytest

from lllm.apps.book import discover

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
MODEL, PROMPT = "smollm2-135m", "The Golden"
# figa1 is about one model (DeepSeek-R1's Qwen 3 distill), not the book's list: it runs once, on `model`.
OWN_MODEL = {"figa1"}
# The figures each chapter writes in the fast configuration on SmolLM2 (file stems, as PNG and SVG).
FIGURES = {
    "fig2": ["fig2_generation"],
    "fig3": ["fig3_reconstruction"],
    "fig4": ["fig4a_magnitudes", "fig4b_spectra"],
    "fig5": ["fig5_spectra"],
    "fig6": ["fig6_layers"],
    "tables1_3": ["tables1_3_decodings"],
    "table4": ["table4_steering"],
    "linearization": ["linearization_choice"],
    "paper_vs_book": ["paper_vs_book"],
    "at_scale": ["at_scale"],
    "figa1": [],  # the weights are not available offline
    "performance": [],  # shows the benchmark harness's own plot
    "architectures": [],  # tables only
}
SPECS = {spec.chapter: spec for spec in discover(NOTEBOOKS)}
_TIMINGS: dict[str, float] = {}


def outputs_text(nb) -> str:
    """Every text output (streams, markdown, plain text, errors) of an executed notebook, joined."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            for kind in ("text/markdown", "text/plain", "text/html"):
                parts.append(output.get("data", {}).get(kind, ""))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The figures each chapter must write
# ---------------------------------------------------------------------------------------------


def test_every_chapter_of_the_paper_has_a_notebook():
    assert set(SPECS) == set(FIGURES)


# ---------------------------------------------------------------------------------------------
# Execution on SmolLM2, fast configuration
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """The environment the kernels inherit: one results cache for the module, this lllm, offline hub."""
    cache = tmp_path_factory.mktemp("lllm-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLLM_CACHE_DIR", str(cache))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        patch.setenv("TQDM_DISABLE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")  # CI has no network: fail at once instead of retrying for a minute
        yield cache
    print("\nnotebook runtimes (fast, SmolLM2): " + ", ".join(f"{k} {v:.0f} s" for k, v in _TIMINGS.items()))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A real sweep (three prompts, every layer) of a tiny model, where the At scale page looks for it."""
    from lllm.apps.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweeps")
    run_sweep("tiny-llama", ["1 2 3", "4 5 6 7", "8 9"], out / "sweep-tiny-llama.parquet", loader="tiny:tiny_loader",
              progress=False)
    return out


def execute(chapter: str, out_dir: Path, **extra) -> nbformat.NotebookNode:
    """Run one notebook with papermill in the fast configuration; the executed notebook."""
    import papermill

    spec = SPECS[chapter]
    own = {"model": MODEL} if spec.scope == "per_model" else {"models": [MODEL]}
    if chapter in OWN_MODEL:
        own = {}  # its own default model: the DeepSeek distill, not available offline
    parameters = {**own, "prompt": PROMPT, "dtype": "float32", "fast": True, "output_dir": str(out_dir / "figures"),
                  **extra}
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    papermill.execute_notebook(str(spec.path), str(out_dir / spec.path.name), parameters=parameters,
                               cwd=str(NOTEBOOKS), progress_bar=False, log_output=False,
                               extra_arguments=["--IPKernelApp.log_level=ERROR"])
    _TIMINGS[chapter] = time.perf_counter() - start
    return nbformat.read(out_dir / spec.path.name, as_version=4)


def assert_figures(chapter: str, out_dir: Path) -> None:
    for stem in FIGURES[chapter]:
        for suffix in (".png", ".svg"):
            path = out_dir / "figures" / f"{stem}{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, f"{chapter} did not write {path.name}"


# per-model chapters first: fig3 computes the shared analysis, the later ones read it from the cache
PER_MODEL = ["fig3", "fig4", "fig6", "tables1_3", "fig2", "linearization", "table4"]


@pytest.mark.parametrize("chapter", PER_MODEL)
def test_per_model_notebook_runs(chapter, kernel_env, tmp_path):
    execute(chapter, tmp_path)
    assert_figures(chapter, tmp_path)


def test_analysis_was_computed_once(kernel_env):
    """The per-model pages share one cached analysis of (SmolLM2, prompt, float32, fast layers)."""
    if set(PER_MODEL) - set(_TIMINGS):
        pytest.skip("needs the per-model notebook runs of this session")
    entries = list((kernel_env / "results" / "analysis").iterdir())
    assert len(entries) == 1, [p.name for p in entries]
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["prompt"] == PROMPT and meta["options"]["layers"] == [0, 10, 20, 29]


def test_fig5_and_paper_vs_book_run(kernel_env, tmp_path):
    fig5 = execute("fig5", tmp_path / "fig5")
    assert_figures("fig5", tmp_path / "fig5")
    assert "smollm2-135m" in outputs_text(fig5)
    paper = execute("paper_vs_book", tmp_path / "paper")
    assert_figures("paper_vs_book", tmp_path / "paper")
    text = outputs_text(paper)
    assert "J⁺ reconstructs y" in text and "threshold" in text


def test_figa1_says_when_the_weights_are_not_available(kernel_env, tmp_path):
    nb = execute("figa1", tmp_path)
    assert "not available offline on this machine" in outputs_text(nb)
    assert not (tmp_path / "figures").exists() or not any((tmp_path / "figures").iterdir())


def test_at_scale_reads_the_sweep_and_says_what_is_missing(sweep_dir, tmp_path):
    nb = execute("at_scale", tmp_path, sweep_dir=str(sweep_dir), models=["tiny-llama", "gemma3-270m"])
    assert_figures("at_scale", tmp_path)
    text = outputs_text(nb)
    assert "no sweep file" in text and "gemma3-270m" in text  # said plainly, not plotted
    assert "tiny-llama" in text  # its summary row


def test_architectures_page_runs_every_tiny_architecture_and_the_survey(kernel_env, tmp_path):
    nb = execute("architectures", tmp_path, survey=str(tmp_path / "no-survey.json"))
    text = outputs_text(nb)
    assert "GPT2LMHeadModel" in text and "DeepseekV3ForCausalLM" in text and "paper eq. 8" in text
    assert "exact" in text and "False" not in text and "refused" not in text  # every tested architecture is exact
    assert "No survey" in text


def test_performance_says_when_there_are_no_results(kernel_env, tmp_path):
    nb = execute("performance", tmp_path, benchmarks_dir=str(tmp_path / "no-benchmarks"))
    assert "No benchmark results" in outputs_text(nb)
