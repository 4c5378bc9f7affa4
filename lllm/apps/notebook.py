"""What every paper notebook does first: style its figures, resolve its prompt, load and analyse.

    prompt = notebook.setup(prompt)  # the parameters cell may leave prompt = None: the paper's prompt
    net, tokenizer, analysis = notebook.load_and_analyze(model, prompt, dtype, fast)
"""

from __future__ import annotations

import html
import os
import textwrap
import warnings
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.text import Text
from torch import nn

from lllm.analyses.pipeline import PromptAnalysis
from lllm.apps.plots import load_analysis, model_name, save_figure
from lllm.defaults import DEFAULT_PROMPT
from lllm.io.models import load

STYLE = {"figure.dpi": 90, "axes.titlesize": 10, "axes.labelsize": 9}  # the figures of every page
PAGE_WIDTH_PX = 688  # the widest a cell's image is shown on a book page at 1280 × 800 (measured in Chromium)
MIN_FONT_PX = 12  # 9 pt: the smallest text a reader should meet in a figure, at the size the page shows it


# Fonts for the tokens DejaVu Sans cannot draw (CJK, Hangul), where installed (Debian's fonts-wqy-microhei, which
# .ci/run installs): matplotlib falls back to them glyph by glyph.
FALLBACK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",)


def _fallback_families() -> list[str]:
    """The families of FALLBACK_FONTS that exist here, added to matplotlib's font list (its cache predates them)."""
    from matplotlib import font_manager

    families, known = [], {entry.fname for entry in font_manager.fontManager.ttflist}
    for path in FALLBACK_FONTS:
        if os.path.exists(path):
            if path not in known:
                font_manager.fontManager.addfont(path)
            families.append(font_manager.FontProperties(fname=path).get_name())
    return families


def setup(prompt: str | None = None) -> str:
    """Style the figures, show every row and column of a table (no "…" hides a layer); the prompt to analyse (None,
    a parameters cell's default: DEFAULT_PROMPT)."""
    plt.rcParams.update(STYLE)
    plt.rcParams["font.family"] = ["DejaVu Sans", *_fallback_families()]
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


def _texts(fig: plt.Figure) -> list[Text]:
    """The visible, non-empty texts of fig (tick labels included, once drawn)."""
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def smallest_font_px(fig: plt.Figure, page_px: int = PAGE_WIDTH_PX) -> float:
    """The smallest text of fig in CSS pixels where a page `page_px` wide shows it (shrunk, never enlarged)."""
    fig.canvas.draw()  # creates the tick labels
    # the inline image is fig at its dpi, cut to its tight bounding box, which text sticking out can widen
    width = max(fig.get_figwidth(), fig.get_tightbbox(fig.canvas.get_renderer()).width)
    shown = min(1.0, page_px / (width * fig.dpi))
    return min((t.get_fontsize() for t in _texts(fig)), default=float("inf")) * fig.dpi / 72 * shown


def readable(fig: plt.Figure, page_px: int = PAGE_WIDTH_PX) -> float:
    """Raise fig's text that the page would show below 9 pt to that size (larger text keeps its size), wrapping
    titles to their axes so that it still fits; the factor by which the smallest text grew (1.0: none did).

    Larger text can widen the image (labels sticking out), which the page then shrinks more: a few rounds settle it.
    """
    total = 1.0
    for _ in range(4):
        factor = _raise_small_text(fig, page_px)
        if factor <= 1.0:
            break
        total *= factor
    return total


def _raise_small_text(fig: plt.Figure, page_px: int) -> float:
    """One round of `readable`: the factor by which the smallest text grew."""
    factor = MIN_FONT_PX / smallest_font_px(fig, page_px)
    if factor <= 1.0 + 1e-9:
        return 1.0
    need = min(t.get_fontsize() for t in _texts(fig)) * factor  # pt: MIN_FONT_PX where the page shows fig
    ticks = set()
    for ax in fig.axes:  # tick labels are re-created on every draw: scale them through their axis
        for axis in (ax.xaxis, ax.yaxis):
            for which in ("major", "minor"):
                labels = axis.get_ticklabels(which=which)
                ticks.update(labels)
                shown = [t for t in labels if t.get_text()]
                if shown:
                    axis.set_tick_params(which=which, labelsize=max(shown[0].get_fontsize(), need))
    for text in _texts(fig):
        if text not in ticks:
            text.set_fontsize(max(text.get_fontsize(), need))
    for ax in fig.axes:  # a title may now be wider than its axes
        width_pt = ax.get_position().width * fig.get_figwidth() * 72
        for loc in ("center", "left", "right"):
            if ax.get_title(loc=loc):
                size = _size_of(ax, ax.get_title(loc=loc))
                ax.set_title(_wrap(ax.get_title(loc=loc), width_pt, size), loc=loc, fontsize=size)
    if fig.get_suptitle():
        size = _size_of(fig, fig.get_suptitle())
        fig.suptitle(_wrap(fig.get_suptitle(), fig.get_figwidth() * 72, size), fontsize=size)
    fig.tight_layout()
    return factor


def _size_of(artist, text: str) -> float:
    """The font size of the child text of artist (an Axes or a Figure) that reads `text`."""
    return next(t.get_fontsize() for t in artist.get_children() if isinstance(t, Text) and t.get_text() == text)


def _wrap(text: str, width_pt: float, size_pt: float) -> str:
    """text wrapped, line by line, to about width_pt at a font of size_pt (a character is about 0.55 em wide)."""
    chars = max(12, int(width_pt / (0.55 * size_pt)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def show_figure(fig: plt.Figure, output_dir: str | os.PathLike, name: str, caption: str) -> None:
    """A page's figure: made readable at page width, saved (png, svg), shown, and captioned under it.

    The caption is an HTML paragraph of class "lllm-caption"; it carries the figure's smallest displayed text size
    (data-font-pt, data-dpi) so that the book's browser test can check it at the width the page really shows it.
    """
    from IPython.display import display  # IPython comes with the notebooks' kernel (the book extra)

    readable(fig)
    save_figure(fig, output_dir, name)
    smallest = min((t.get_fontsize() for t in _texts(fig)), default=None)  # None: a figure without text
    dpi = fig.dpi
    plt.show()
    display(figure_caption(caption, font_pt=smallest, dpi=dpi))


def figure_caption(text: str, *, font_pt: float | None = None, dpi: float | None = None):
    """The caption under a figure, as HTML (class "lllm-caption"); with the figure's smallest font and dpi when
    known (show_figure), for the browser test's size check."""
    from IPython.display import HTML

    data = "" if font_pt is None else f' data-font-pt="{font_pt:.2f}" data-dpi="{dpi:g}"'
    return HTML(f'<p class="lllm-caption"{data}><strong>Figure.</strong> {html.escape(text)}</p>')
