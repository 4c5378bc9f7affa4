"""`load`: a model and its tokenizer from an embedded short name, a hub id, a local directory or a GGUF file,
with checked dtype and device, and verified dense copies of GGUF weights in lllm's cache."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from lllm.errors import ArgumentError, ModelFileError, UnknownModelError, UnsupportedModelError
from lllm.io.embedded import EMBEDDED_MODELS, cache_dir, embedded_model_path, list_embedded
from lllm.io.files import content_check, remove_dead_temporaries, remove_tree, sha256_file, temporary_path

log = logging.getLogger(__name__)


# The dtypes a model can be loaded in, by the names the CLI and the book accept.

# A hub id is exactly owner/name; anything else that is not a path is a typo of a short name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype, also accepted by name ("float64")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentError(f"dtype must be a torch floating dtype such as torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table, so that a corrupt or truncated file fails with ModelFileError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        # The reader maps tensor data lazily; check that every tensor lies inside the file.
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad bytes
        raise ModelFileError(f"{path} is not a readable GGUF file (corrupt or truncated?): {exc}") from exc
    if end > path.stat().st_size:
        raise ModelFileError(f"{path} is truncated: its tensors need {end} bytes, the file has {path.stat().st_size}")


def check_model_reference(name_or_path: Any) -> None:
    """Refuse, without reading any weights, what cannot name a model: not an embedded short name, an existing
    path, or a hub id of the form owner/name."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ArgumentError(f"the model must be a short name ({', '.join(list_embedded())}), a hub id, a local "
                            f"directory or a .gguf file; got {type(name_or_path).__name__} {name_or_path!r}")
    text = os.fspath(name_or_path)
    if not str(text).strip():
        raise UnknownModelError(f"the model name is empty; give a short name ({', '.join(list_embedded())}), "
                                "a hub id, a local directory or a .gguf file")
    if text not in EMBEDDED_MODELS and not Path(text).expanduser().exists() and not _HUB_ID.match(text):
        raise UnknownModelError(
            f"{text!r} is not an embedded model ({', '.join(list_embedded())}), an existing .gguf file or "
            f"model directory, or a hub id of the form owner/name"
        )


def resolve_source(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Where to load from: provenance dict plus 'where' (dir or hub id) and 'gguf_file' (or None)."""
    check_model_reference(name_or_path)
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[text]
        path = embedded_model_path(text)
        return {"name": text, "path": str(path), "sha256": spec.sha256, "family": spec.family,
                "where": str(path.parent), "gguf_file": path.name}
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFileError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model directory")
        # Hash local files too, so that results record exactly which weights they came from.
        return {"name": path.stem, "path": str(path.resolve()), "sha256": sha256_file(path), "family": None,
                "where": str(path.resolve().parent), "gguf_file": path.name}
    if path.is_dir():
        return {"name": path.resolve().name, "path": str(path.resolve()), "sha256": None, "family": None,
                "where": str(path.resolve()), "gguf_file": None}
    if _HUB_ID.match(text):
        return {"name": text, "path": None, "sha256": None, "family": None, "where": text, "gguf_file": None,
                "hub": True}
    raise ModelFileError(f"{path} is neither a file nor a directory; pass a .gguf file or a model directory")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (no request is sent)."""
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:  # no route, no DNS, refused, timed out
        return False


def from_pretrained(cls: Any, source: dict[str, Any], **kwargs: Any) -> Any:
    """cls.from_pretrained with bad files mapped to ModelFileError and unknown hub ids to UnknownModelError."""
    where, gguf_file = source["where"], source["gguf_file"]
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        if source.get("hub"):
            try:  # the local HF cache first, so that a cached model loads offline without network retries
                return cls.from_pretrained(where, local_files_only=True, **kwargs)
            except OSError:
                if hub_offline():  # the user said there is no network: do not wait for retries to fail
                    raise
                return cls.from_pretrained(where, **kwargs)
        return cls.from_pretrained(where, **kwargs)
    except Exception as exc:
        if gguf_file:
            # Diagnose only on failure: parsing the file again costs seconds that a good file need not pay.
            check_gguf(Path(where) / gguf_file)
        if isinstance(exc, (ValueError, NotImplementedError)) and "not supported" in str(exc):
            raise UnsupportedModelError(f"transformers cannot load {source['path'] or where}: {exc}") from exc
        if isinstance(exc, OSError) and source.get("hub"):
            raise UnknownModelError(
                f"{where!r} is not in the local Hugging Face cache and could not be fetched: {exc}. "
                f"Embedded short names: {', '.join(list_embedded())}"
            ) from exc
        # A local file or directory that does not parse (a truncated model.safetensors raises SafetensorError).
        file_errors = (OSError, ValueError, KeyError, IndexError, struct.error) if not source.get("hub") else (OSError,)
        if isinstance(exc, file_errors) or type(exc).__name__ == "SafetensorError":
            raise ModelFileError(f"could not load {source['path']}: {exc}") from exc
        raise


def dense_copy_path(source: dict[str, Any], dtype: torch.dtype) -> Path | None:
    """Where the dequantized copy of a GGUF with a known sha256 lives (per dtype and transformers version)."""
    if not source["gguf_file"] or not source["sha256"]:
        return None
    import transformers

    tag = f"{source['sha256'][:16]}-tf{transformers.__version__}-{str(dtype).removeprefix('torch.')}"
    return cache_dir() / "dense" / tag


DENSE_MANIFEST = "complete"  # in a dense copy: what it was made from, and every file's size and CRC-32


def write_dense_copy(model: Any, tokenizer: Any, target: Path, source_sha256: str) -> None:
    """save_pretrained into a temporary sibling, record every file's check, then one rename: readers never see
    half a copy, and a later change to any byte of it is caught by `dense_copy_problem`."""
    tmp = temporary_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(target.parent)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: content_check(p) for p in sorted(tmp.iterdir())}
        manifest = {"made_from_gguf_sha256": source_sha256, "files": files}
        (tmp / DENSE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, target)
    except OSError as exc:  # another process won the race, or the cache is full or read-only: it is a speed-up
        if not (target / DENSE_MANIFEST).exists():
            log.warning("could not write the dense copy %s (%s); the next load dequantizes the GGUF again",
                        target, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:  # Ctrl-C included: never leave a half-written copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dense_copy_problem(dense: Path, source_sha256: str) -> str | None:
    """None if every file of the dense copy matches its manifest, else what is wrong with it."""
    try:
        text = (dense / DENSE_MANIFEST).read_text()
        if text.startswith("dequantized from"):
            return "it was written by an earlier lllm without a record of its files (rebuilt once, then verified)"
        manifest = json.loads(text)
        files, made_from = manifest["files"], manifest["made_from_gguf_sha256"]
        present = {p.name for p in dense.iterdir()} - {DENSE_MANIFEST}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest is missing or unreadable ({type(exc).__name__}: {exc})"
    if made_from != source_sha256:
        return f"it was made from the GGUF with sha256 {made_from}, not {source_sha256}"
    if present != set(files):
        return f"its files {sorted(present)} are not those it was written with {sorted(files)}"
    for name, expected in files.items():
        try:
            got = content_check(dense / name)
        except OSError as exc:
            return f"{name} cannot be read ({exc})"
        if got != expected:
            return f"{name} has size {got['size']} and CRC-32 {got['crc32']}, it was written with {expected}"
    return None


def verified_dense_copy(source: dict[str, Any], dtype: torch.dtype) -> Path | None:
    """The dense copy of a sha256-verified GGUF if it exists and every byte checks; a corrupt one is removed
    (and said so), so that it is rebuilt from the GGUF."""
    dense = dense_copy_path(source, dtype)
    if dense is None or not dense.exists():
        return None
    problem = dense_copy_problem(dense, source["sha256"])
    if problem is None:
        return dense
    log.warning("the dense copy %s of %s cannot be trusted: %s. Removing it and dequantizing the verified GGUF "
                "again", dense, source["name"], problem)
    remove_tree(dense)
    return None


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"device {device!r} is not a torch device such as 'cpu' or 'cuda:0' ({exc})") from exc
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ArgumentError(f"device {str(device)!r} is not available on this machine (torch sees no {device.type}); "
                            "use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ArgumentError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                            "CUDA device(s)")
    return device


def load(
    name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, *, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode with eager attention, frozen parameters and provenance attached."""
    dtype, device = check_dtype(dtype), check_device(device)
    source = resolve_source(name_or_path)  # before importing transformers, so that bad arguments fail fast
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "eager"}  # sdpa would bypass eager patches
    if source["gguf_file"]:
        # Plain dense weights in `dtype`: packed GGUF blocks would compute in float32 and hide the linear maps.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    dense = verified_dense_copy(source, dtype)
    if dense is not None:
        # The sha256-verified GGUF was dequantized before: its dense copy loads in seconds, not ~30 s.
        tokenizer = AutoTokenizer.from_pretrained(dense)
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, attn_implementation="eager")
    else:
        tokenizer = from_pretrained(AutoTokenizer, source)  # first: it fails faster on a bad file
        model = from_pretrained(AutoModelForCausalLM, source, **kwargs)
        target = dense_copy_path(source, dtype)
        if target is not None:
            write_dense_copy(model, tokenizer, target, source["sha256"])
    model.eval()
    if getattr(model.config, "_experts_implementation", "eager") != "eager":
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel; eager runs ops lllm can see
    for p in model.parameters():
        p.requires_grad_(False)
    # transformers may leave some GGUF tensors in another dtype; the float64 reconstruction needs all of them.
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model.to(dtype)
    model.to(device)
    wrong = {p.dtype for p in model.parameters() if p.dtype != dtype}
    if wrong:
        raise UnsupportedModelError(f"parameters of {source['name']} stayed in {wrong}, not {dtype}")
    if model.config._attn_implementation != "eager":
        raise UnsupportedModelError(f"{source['name']} uses {model.config._attn_implementation!r} attention, not eager")
    family = source["family"] or model.config.model_type
    model.config.lllm_name = source["name"]
    model.lllm_source = {"name": source["name"], "path": source["path"], "sha256": source["sha256"], "family": family}
    return model, tokenizer
