"""The prompt set of a sweep: reading it, naming each prompt, and the layers spec ("all", "every:3", "0,5,-1")."""

from __future__ import annotations

import logging
import hashlib
import importlib
import importlib.resources
import os
import re
from collections.abc import Iterable
from pathlib import Path


from lllm.errors import SweepError

log = logging.getLogger("lllm.apps.sweep")



def prompt_id(prompt: str) -> str:
    """The stable id of a prompt: the first 16 hex digits of the sha256 of its UTF-8 text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def read_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts of a file (one a line; blank lines and #-comments skipped), or the bundled set."""
    if path is None:
        text = importlib.resources.files("lllm.data").joinpath("prompts.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SweepError(f"cannot read the prompt file {path}: {exc}") from exc
        except UnicodeDecodeError as exc:
            line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
            raise SweepError(f"the prompt file {path} is not UTF-8 text (line {line}: {exc.reason}); "
                             "save it as UTF-8") from exc
    prompts = [line.strip() for line in text.splitlines()]
    return [p for p in prompts if p and not p.startswith("#")]


def unique_prompts(prompts: Iterable[str]) -> list[str]:
    """The prompts in order with repeats dropped (a repeat has the same id, so it would be one row)."""
    seen: set[str] = set()
    unique = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise SweepError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        if prompt_id(prompt) in seen:
            log.warning("prompt %r appears more than once; it is analyzed once", prompt)
            continue
        seen.add(prompt_id(prompt))
        unique.append(prompt)
    return unique


_LAYERS_SPEC = re.compile(r"^(all|none|every:[1-9][0-9]*|-?[0-9]+(,-?[0-9]+)*)$")


def check_layers_spec(spec: str) -> str:
    """The spec, normalized, if it is "all", "none", "every:K" (K ≥ 1) or "0,5,-1"; else SweepError."""
    normalized = spec.replace(" ", "").lower()
    if not _LAYERS_SPEC.match(normalized):
        raise SweepError(f"layers must be 'all', 'none', 'every:K' with K ≥ 1, or a comma-separated list of "
                         f"layer numbers (negative counts from the end), got {spec!r}")
    return normalized


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """Layer numbers of a spec: "all", "none", "every:K" (K-th layers back from the last), or "0,5,-1"."""
    spec = check_layers_spec(spec)
    if spec in ("all", "none"):
        return list(range(n_layers)) if spec == "all" else []
    if spec.startswith("every:"):
        return list(range(n_layers - 1, -1, -int(spec.removeprefix("every:"))))[::-1]
    numbers = [int(part) for part in spec.split(",")]
    bad = [n for n in numbers if not -n_layers <= n < n_layers]
    if bad:
        raise SweepError(f"layers {bad} are outside the model's {n_layers} layers")
    return sorted({n % n_layers for n in numbers})
