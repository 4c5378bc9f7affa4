"""`lllm book`: run every paper notebook for every model through papermill, then build the Jupyter Book.

Notebooks are discovered from their notebook-level metadata, nothing is listed by hand::

    {"lllm": {"chapter": "fig3", "title": "Figure 3: ...", "order": 3, "scope": "per_model"}}

A ``per_model`` notebook runs once per model with the parameters model, prompt, dtype, fast and
output_dir; an ``all_models`` notebook runs once, after the per-model ones, with models (a list),
prompt, dtype, fast and output_dir. Executed notebooks go to
``<book>/generated/<chapter>/<model-slug>.ipynb`` and figure files to
``<book>/generated/figures/<chapter>/<model-slug>/``. A run whose inputs (notebook source,
parameters, lllm code, and the data files named by the optional metadata ``"reads"``: glob patterns
from the notebook's directory, such as sweep output) are unchanged since its last success is skipped. A failing notebook does not
stop the others; every failure is reported with its notebook, model and cell. Then
``<book>/_toc.yml`` is written from what ran and the book is built with ``jupyter-book build -W``.
"""

from lllm.apps.book.execute import BookReport, execute_all
from lllm.apps.book.notebooks import (
    API_MODULES, DEFAULT_MODELS, FAST_MODELS, FAST_PROMPT, SCOPES, NotebookSpec, discover, model_slug,
)
from lllm.apps.book.runs import Run, code_fingerprint, plan
from lllm.apps.book.site import build_book

__all__ = ["API_MODULES", "DEFAULT_MODELS", "FAST_MODELS", "FAST_PROMPT", "SCOPES", "BookReport", "NotebookSpec", "Run",
           "build_book", "code_fingerprint", "discover", "execute_all", "model_slug", "plan"]
