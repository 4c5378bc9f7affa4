"""The landing page's headline table: what this build measured, gathered from the notebooks that ran.

A notebook contributes by writing `<output_dir>/headline.json` (`record`): "Paper vs. this book" one entry per
model (its errors, stable ranks and verdict counts), "Supported architectures" the count of exact architectures.
After the runs, `write_headline` turns every headline.json of this build's runs into generated/headline.md,
which book/intro.md includes; a build that ran neither notebook says so instead of showing a table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from lllm.io.files import write_bytes_atomically

FILE = "headline.json"
PAGE = Path("generated") / "headline.md"


def record(output_dir: str | os.PathLike, section: str, data: dict) -> Path:
    """Write a notebook's contribution {section: data} to <output_dir>/headline.json (merged with what is there)."""
    path = Path(output_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    found = json.loads(path.read_text()) if path.exists() else {}
    found[section] = data
    write_bytes_atomically(path, json.dumps(found, indent=1, sort_keys=True).encode())
    return path


def _gather(figure_dirs: Sequence[Path]) -> dict:
    sections: dict = {}
    for directory in figure_dirs:
        path = Path(directory) / FILE
        if path.exists():
            for section, data in json.loads(path.read_text()).items():
                sections.setdefault(section, {}).update(data)
    return sections


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def headline_markdown(figure_dirs: Sequence[Path]) -> str:
    """The markdown of the headline table from the headline.json files under `figure_dirs`."""
    sections = _gather(figure_dirs)
    models, architectures = sections.get("models", {}), sections.get("architectures")
    lines = []
    if models:
        verdicts = [name for name, _ in next(iter(models.values()))["verdicts"]]  # as lllm.apps.claims names them
        lines += [
            "| model | J⁺ error, float32 | J⁺ error, float64 | ordinary J error | max stable rank of J⁺ᵢ (of d) | "
            "cumulative stable rank, first → last layer | claims: " + " / ".join(verdicts) + " |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m in models.items():
            counts = " / ".join(str(dict(m["verdicts"]).get(v, 0)) for v in verdicts)
            lines.append(
                f"| {name} | {_number(m.get('float32_error'), '.1e')} | {_number(m.get('float64_error'), '.1e')} | "
                f"{_number(m.get('ordinary_error'), '.2g')} | {m['max_token_stable_rank']:.2f} (of {m['d']}) | "
                f"{m['first_rank']:.2f} (layer {m['first_layer']}) → {m['last_rank']:.2f} (layer {m['last_layer']}) "
                f"| {counts} |")
        lines += ["", "Errors are std(y − Σᵢ J⁺ᵢxᵢ − c)/std(y) on the book's prompt; the claims are those of "
                  "{doc}`Paper vs. this book <generated/chapters/paper_vs_book>`."]
    else:
        lines.append("*This build did not run the “Paper vs. this book” notebook, so it has no per-model headline.*")
    if architectures:
        lines += ["", f"**Supported architectures:** {architectures['exact']} of {architectures['checked']} "
                  "architectures checked on a tiny random model of transformers' own class are exact in float32 and "
                  "float64 (see {doc}`Supported architectures <generated/chapters/architectures>`)."]
    return "\n".join(lines) + "\n"


def write_headline(book_dir: Path, figure_dirs: Sequence[Path]) -> Path:
    """Write <book>/generated/headline.md for this build's runs; its path."""
    path = Path(book_dir) / PAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, headline_markdown(figure_dirs).encode())
    return path
