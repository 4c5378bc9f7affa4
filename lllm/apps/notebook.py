"""What every paper notebook does first: style its figures, resolve its prompt, load and analyse.

    prompt = notebook.setup(prompt)  # the parameters cell may leave prompt = None: the paper's prompt
    net, tokenizer, analysis = notebook.load_and_analyze(model, prompt, dtype, fast)
"""

from __future__ import annotations

import warnings
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from torch import nn

from lllm.analyses.pipeline import PromptAnalysis
from lllm.apps.plots import load_analysis, model_name
from lllm.defaults import DEFAULT_PROMPT
from lllm.io.models import load

STYLE = {"figure.dpi": 90, "axes.titlesize": 10, "axes.labelsize": 9}  # the figures of every page


def setup(prompt: str | None = None) -> str:
    """Style the figures, show every row and column of a table (no "…" hides a layer); the prompt to analyse (None,
    a parameters cell's default: DEFAULT_PROMPT)."""
    plt.rcParams.update(STYLE)
    # A token in a script the figure font lacks (CJK, Hangul) is drawn as a box; matplotlib's warning about it would
    # print the machine's path to lllm on the page, once per glyph.
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
    pd.set_option("display.max_columns", None)
    pd.set_option("display.max_rows", None)
    return DEFAULT_PROMPT if prompt is None else prompt


def header(model: nn.Module, analysis: PromptAnalysis, dtype: str) -> str:
    """The markdown line that opens a per-prompt page: model, tokens, prediction, layers analyzed."""
    meta = analysis.meta
    top = meta["next_tokens"][0]
    every = analysis.layers == list(range(model.config.num_hidden_layers))
    return (f"**{model_name(model)}**, {dtype}: tokens {meta['tokens']}, predicted next token "
            f"**{top['token']!r}** (p = {top['prob']:.2f}); layers analyzed: {'all' if every else analysis.layers}")


def load_and_analyze(model: str, prompt: str, dtype: str, fast: bool,
                     layers: list[int] | None = None) -> tuple[nn.Module, Any, PromptAnalysis]:
    """Load model, analyse prompt in the book's shared cached configuration (or only `layers`), show the header."""
    from IPython.display import Markdown, display  # IPython comes with the notebooks' kernel (the book extra)

    net, tokenizer = load(model, dtype=dtype)
    analysis = load_analysis(net, tokenizer, prompt, fast, layers)
    display(Markdown(header(net, analysis, dtype)))
    return net, tokenizer, analysis
