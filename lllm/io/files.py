"""Files written so that readers never see half of them: durable renames, named temporaries that a later run
can clean up after a killed writer, and the checksums the caches verify."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import uuid
import zlib
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_check(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file: a cheap check (about 2 GB/s) that catches flipped or truncated bytes."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def host_name() -> str:
    """This machine's name, without dots, as temporaries carry it (a cache may be shared between machines)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temporary_path(target: Path, what: str = "tmp") -> Path:
    """A hidden, unique sibling of target that names this machine and process, so that a later run can tell
    whether its writer is gone: .<name>.<what>.<host>.<pid>.<random>.tmp"""
    return target.with_name(f".{target.name}.{what}.{host_name()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


TEMPORARY_NAME = re.compile(r"^\..+\.([A-Za-z0-9_-]+)\.(\d+)\.[0-9a-f]{8}\.tmp$")


def remove_dead_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries in `directory` whose process on this machine no longer runs (a Ctrl-C, a kill)."""
    removed = []
    for path in directory.glob(".*.tmp") if directory.is_dir() else ():
        match = TEMPORARY_NAME.match(path.name)
        if match is None or match.group(1) != host_name() or pid_alive(int(match.group(2))):
            continue  # another machine's, or a live writer's
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (ours counts: its temporary may be in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: Path) -> None:
    """Take a directory out of view with one rename, then delete it (a cache that cannot be changed keeps it)."""
    trash = temporary_path(path, "trash")
    try:
        os.replace(path, trash)
    except OSError:  # gone already, or a read-only cache
        return
    shutil.rmtree(trash, ignore_errors=True)


def replace_durably(tmp: Path, path: Path) -> None:
    """Flush tmp to disk, then rename it over path (atomic on POSIX) and make the new name durable."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write `data` as `path` all at once: readers see the old file or the new one, never part of it."""
    tmp = temporary_path(path)
    tmp.write_bytes(data)
    replace_durably(tmp, path)
