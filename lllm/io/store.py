"""Results persistence: every result is a directory holding `tensors.safetensors` and `meta.json`.

Writes are atomic (a hidden temporary sibling, fsync, then one rename), so an interrupted write never
leaves a visible entry. Every entry carries the sha256 of its tensors file in meta.json and the sha256
of its metadata in the safetensors header, so corruption of either file is detected on load and raises
CacheError. `ResultCache` addresses entries by the sha256 of a canonical JSON of what was computed:
kind, model identity, prompt / token ids, dtype, options and the lllm version.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lllm.errors import CacheError, OutputPathError
from lllm.io.codecs import as_json_native, canonical_json, dtype_name, sha256_text, versions
from lllm.io.files import fsync_dir, sha256_file

log = logging.getLogger(__name__)

TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
FORMAT = "lllm-result/1"
# Fields that every entry's metadata records (None where they do not apply, e.g. prompt for raw ids).
REQUIRED_META = ("model", "prompt", "token_ids", "dtype", "options")
# A temporary entry this old belongs to a writer that died; younger ones may still be being written.
STALE_TEMPORARY_SECONDS = 3600.0
_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- canonical JSON


# ----------------------------------------------------------------------------- model identity


# ----------------------------------------------------------------------------- atomic entries


def _storable(name: Any, tensor: Any) -> torch.Tensor:
    """A CPU, contiguous tensor that owns its storage, as safetensors requires."""
    if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
        raise CacheError(f"tensors must map str names to tensors; got {name!r}: {type(tensor).__name__}")
    tensor = tensor.detach().cpu()
    # Views (an output row, a slice of J) share storage with a larger tensor; safetensors refuses those.
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.contiguous().clone()
    return tensor


def entry_files_only(path: Path) -> bool:
    """True when an existing directory holds nothing but entry files (so replacing it loses nothing else)."""
    return {p.name for p in path.iterdir()} <= {TENSORS_FILE, META_FILE}


def check_entry_target(path: Path, what: str) -> None:
    """Refuse, before any work, an entry path that exists and is not an entry lllm wrote (replacing it would lose
    the user's files)."""
    if path.exists() and not (path.is_dir() and entry_files_only(path)):
        raise OutputPathError(f"{what} {path} holds files that lllm did not write; give a new or empty directory")


def _remove_entry(path: Path) -> None:
    """Take an entry out of view with one rename, then delete it; a concurrent removal is fine."""
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of this entry left by writers that died more than an hour ago."""
    now = time.time()
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def _write_entry(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], replace: bool) -> dict:
    """Write an entry atomically and return its metadata; with `replace` off, another writer's entry wins."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CacheError(f"result metadata lacks {missing}; build it with lllm.io.codecs.computation_fields()")
    if path.exists() and not (path.is_dir() and entry_files_only(path)):
        raise CacheError(f"{path} exists and is not a result entry; refusing to replace it")
    tensors = {name: _storable(name, t) for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")  # hidden, and unique per writer
    tmp.mkdir()
    try:
        stored = as_json_native(meta)
        stored.update(
            format=FORMAT, versions=versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            tensors={name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()},
        )
        # The header carries the metadata's digest and meta.json the file's: each file vouches for the other.
        header = {"meta_sha256": sha256_text(canonical_json(stored))}
        safetensors.torch.save_file(tensors, tmp / TENSORS_FILE, metadata=header)
        stored["tensors_sha256"] = sha256_file(tmp / TENSORS_FILE)
        with open(tmp / META_FILE, "w", encoding="ascii") as f:
            json.dump(stored, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / TENSORS_FILE, "rb") as f:
            os.fsync(f.fileno())
        fsync_dir(tmp)
        while True:
            try:
                os.replace(tmp, path)  # atomic; refuses a non-empty target: an existing entry
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)  # another writer's entry for the same key stands
                return stored
            _remove_entry(path)
        fsync_dir(path.parent)
        return stored
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_result(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write `tensors` and `meta` (JSON-able, with REQUIRED_META keys) as the entry directory `path`.

    The write is atomic: readers see the old entry, no entry, or the complete new one. An existing
    entry is replaced; an existing directory that holds anything else is refused.
    """
    path = Path(path)
    _write_entry(path, tensors, meta, replace=True)
    return path


def load_result(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of an entry, verified against both digests; CacheError if anything is off."""
    path = Path(path)
    if not path.is_dir():
        raise CacheError(f"{path} is not a result entry (no such directory)")
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="ascii"))
    except FileNotFoundError as exc:
        raise CacheError(f"{path} has no {META_FILE}: the entry is incomplete") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path / META_FILE} is not valid JSON ({exc}): the entry is corrupt") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tensors_sha256" not in meta:
        raise CacheError(f"{path / META_FILE} is not {FORMAT} metadata: the entry is corrupt")
    tensors_file = path / TENSORS_FILE
    try:
        sha = sha256_file(tensors_file)
    except FileNotFoundError as exc:
        raise CacheError(f"{path} has no {TENSORS_FILE}: the entry is incomplete") from exc
    if sha != meta["tensors_sha256"]:
        raise CacheError(f"{tensors_file} has sha256 {sha}, its metadata says {meta['tensors_sha256']}: corrupt")
    try:
        with safetensors.safe_open(tensors_file, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types, and OSError / ValueError
        raise CacheError(f"{tensors_file} cannot be parsed as safetensors ({exc}): corrupt") from exc
    body = {k: v for k, v in meta.items() if k != "tensors_sha256"}
    if header.get("meta_sha256") != sha256_text(canonical_json(body)):
        raise CacheError(f"{path / META_FILE} does not match the digest recorded with its tensors: corrupt")
    return tensors, meta


# ----------------------------------------------------------------------------- JacobianResult records


# ----------------------------------------------------------------------------- the cache


def default_root() -> Path:
    """lllm.io.models.cache_dir()/results, else $LLLM_CACHE_DIR/results, else ~/.cache/lllm/results."""
    try:
        from lllm.io.embedded import cache_dir
    except ImportError:  # lllm.io.models absent or broken: the environment variable is the contract
        base = os.environ.get("LLLM_CACHE_DIR")
        return (Path(base).expanduser() if base else Path.home() / ".cache" / "lllm") / "results"
    return cache_dir() / "results"


@contextmanager
def _computing(path: Path) -> Iterator[None]:
    """An exclusive lock on one key (a file in the cache's .locks/), held while it is looked up and computed;
    released by the kernel if the process dies. A cache that cannot be written is used without it."""
    try:
        locks = path.parent.parent / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / f"{path.parent.name}-{path.name}.lock", "w")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class ResultCache:
    """A content-addressed store of results under root/<kind>/<sha256 key>/."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def key(self, kind: str, key_fields: Mapping[str, Any]) -> str:
        """Hex sha256 of the canonical JSON of (kind, key fields, lllm version)."""
        import lllm  # late, as in versions()

        return sha256_text(canonical_json({"kind": kind, "fields": key_fields, "lllm": lllm.__version__}))

    def path(self, kind: str, key: str) -> Path:
        """The entry directory of a key."""
        if not _KIND.match(kind):
            raise CacheError(f"kind {kind!r} must be letters, digits, '_', '.' or '-' (it names a directory)")
        return self.root / kind / key

    def get_or_compute(
        self,
        kind: str,
        key_fields: Mapping[str, Any],
        compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
        """(tensors, meta, hit): the stored entry, or compute() stored under the key of (kind, key_fields).

        key_fields (see computation_fields) are recorded in the meta, over compute()'s. A corrupt entry is
        logged, deleted and recomputed. A second process (or thread) asking for a key that is being
        computed waits for it and reads the entry; where the cache cannot be written, both compute.
        """
        key = self.key(kind, key_fields)
        path = self.path(kind, key)
        with _computing(path):  # a second process asking for the same key waits, then reads the entry
            return self._get_or_compute(kind, key, path, key_fields, compute)

    def _get_or_compute(self, kind, key, path, key_fields, compute):
        """get_or_compute's body, run while this process holds the key's lock (where the cache is writable)."""
        if path.exists():
            try:
                tensors, meta = load_result(path)
                if meta.get("cache", {}).get("key") != key:
                    raise CacheError(f"{path} holds the entry of key {meta.get('cache', {}).get('key')}")
                return tensors, meta, True
            except CacheError as exc:
                log.warning("discarding corrupt cache entry %s and recomputing: %s", path, exc)
                _remove_entry(path)
        tensors, meta = compute()
        # The key fields say what was computed; compute()'s meta fills what they leave None (token ids).
        meta = dict(meta)
        for name, value in as_json_native(key_fields).items():
            if value is not None or name not in meta:
                meta[name] = value
        meta["cache"] = {"kind": kind, "key": key}
        try:
            _remove_stale_temporaries(path)
            # Losing a race to another writer is fine: both computed the same key, and its entry stands.
            stored = _write_entry(path, tensors, meta, replace=False)
        except OSError as exc:  # a read-only or full cache costs the reuse, not the finished result
            log.warning("the results cache %s cannot be written (%s); the result is returned but not cached",
                        self.root, exc)
            return dict(tensors), as_json_native(meta), False
        return dict(tensors), stored, False
