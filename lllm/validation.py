"""Arguments checked at the boundary, before any expensive work: each refusal an lllm error saying what to do."""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from lllm.errors import ArgumentError, OutputPathError, PromptError

F = TypeVar("F", bound=Callable[..., Any])


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """value as an int, refusing bools, floats, strings and values below `minimum`."""
    try:  # ints, numpy ints and one-element integer tensors; never a bool, a float or a string
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and number < minimum:
        raise ArgumentError(f"{name} must be ≥ {minimum}, got {number}")
    return number


def check_type(value: Any, expected: type | tuple[type, ...], name: str, hint: str = "") -> Any:
    """value if it is an instance of `expected`, else ArgumentError naming what was given (and `hint`)."""
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ArgumentError(f"{name} must be a {names}, got {type(value).__name__}" + (f"; {hint}" if hint else ""))
    return value


def check_prompt_text(prompt: Any) -> str:
    """A prompt given as text: a string with at least one non-blank character."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"the prompt is empty; give at least one token of text (got {prompt!r})")
    return prompt


def check_chunk_size(chunk_size: Any) -> int | None:
    """None (the default) or a positive int."""
    return None if chunk_size is None else check_int(chunk_size, "chunk_size", minimum=1)


def check_position(position: Any, n_tokens: int) -> int:
    """The output position as an index in 0 … T-1; negative positions count from the end."""
    position = check_int(position, "position")
    if not -n_tokens <= position < n_tokens:
        raise PromptError(f"position {position} is outside the {n_tokens}-token prompt "
                          f"(allowed: {-n_tokens} … {n_tokens - 1}, -1 is the last token)")
    return position % n_tokens


def check_layers(layers: Iterable[Any] | None, n_layers: int) -> list[int]:
    """Sorted layer numbers in 0 … L-1 (None: all); negative numbers count from the end, nothing wraps."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ArgumentError(f"layers must be a list of layer numbers or None (all), got {layers!r}")
    numbers_ = [check_int(ell, "a layer number") for ell in layers]
    if not numbers_:
        raise ArgumentError("layers is empty; give at least one layer number, or None for all layers")
    bad = [ell for ell in numbers_ if not -n_layers <= ell < n_layers]
    if bad:
        raise ArgumentError(f"layers {bad} are outside the model's {n_layers} layers "
                            f"(allowed: {-n_layers} … {n_layers - 1}, -1 is the last layer)")
    return sorted({ell % n_layers for ell in numbers_})


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """value if it is one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_components(components: Any, known: Sequence[str]) -> tuple[str, ...]:
    """A non-empty tuple of known component names, in the order given."""
    if isinstance(components, str) or not isinstance(components, Iterable):
        raise ArgumentError(f"components must be a list of names from {list(known)}, got {components!r}")
    components = tuple(components)
    bad = [c for c in components if c not in known]
    if bad or not components:
        raise ArgumentError(f"components must be a non-empty subset of {list(known)}, got {list(components)}")
    return components


def token_id_list(ids: Any) -> list[int]:
    """Token ids given as a list or tensor of integers, as a list: one prompt (a (1, T) batch is accepted)."""
    tensor = ids if isinstance(ids, torch.Tensor) else None
    if tensor is None:
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ArgumentError(f"a prompt must be text or a list of token ids, got {type(ids).__name__}: {exc}") from exc
    if tensor.numel() == 0:
        return []  # the caller refuses an empty prompt
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        shown = tensor.reshape(-1)[:4].tolist() if isinstance(ids, torch.Tensor) else list(ids)[:4]
        raise ArgumentError(f"token ids must be integers, got {shown}; "
                            "tokenize the text, or pass the prompt as a string")
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise ArgumentError(f"token ids must be one prompt, a list of T ids or a (1, T) tensor; got shape "
                            f"{tuple(tensor.shape)}. Call lllm once per prompt")
    return [int(i) for i in tensor.tolist()]


def grad_enabled(function: F) -> F:
    """Run `function` with autograd on, also when called under torch.no_grad() or torch.inference_mode()."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def writable_directory(path: str | os.PathLike, what: str) -> Path:
    """`path` as a directory that can be created and written, checked before the work that fills it.

    Refuses a path that is an existing file, lies under a file, or whose nearest existing directory
    is not writable, so that the error comes before the computation rather than after it.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is an existing file, not a directory; give a directory")
    _check_ancestors(path, what)
    return path


def writable_file(path: str | os.PathLike, what: str, *, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """`path` as a file that can be written: not a directory, not one of `inputs`, its directory writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give a file name")
    for source in inputs:
        if source is not None and Path(source).expanduser().exists() and path.exists() \
                and os.path.samefile(path, Path(source).expanduser()):
            raise OutputPathError(f"{what} {path} is the input file {source}; writing it would destroy the input. "
                                  "Give another output path")
    _check_ancestors(path.parent if str(path.parent) else Path("."), what)
    return path


def _check_ancestors(path: Path, what: str) -> None:
    """The nearest existing ancestor of path (or path itself) is a writable directory."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{what} {path} lies under {probe}, which is a file; give a path under a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path} cannot be written: {probe} is not writable")
