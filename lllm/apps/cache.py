"""`lllm cache`: what lllm keeps in its cache directory, how large it is, and clearing it.

Everything in the cache is derived and verified before use, so any part of it can be deleted at the
cost of recomputing it: the assembled GGUF files (sha256 on every load), the dense copies of the
weights (size and CRC-32 of every file on every load) and the results (sha256 of both files on every
read).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

from lllm.io.embedded import EMBEDDED_MODELS, cache_dir
from lllm.io.files import remove_dead_temporaries

# section -> what it holds; each is a directory under the cache root.
SECTIONS = {
    "models": "embedded GGUF files assembled from their chunk packages",
    "dense": "dequantized weights of the embedded models, per dtype and transformers version (loads in seconds)",
    "results": "analysis results, addressed by model, prompt, dtype and options",
}


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache: a model's files, a dense copy, or the results of one kind."""

    section: str
    name: str
    path: Path
    bytes: int


def _size(path: Path) -> int:
    """Bytes of a file or of every file under a directory (0 if it vanished meanwhile)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for child in path.rglob("*"):
        try:
            total += child.stat().st_size if child.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def _label(section: str, name: str) -> str:
    """A dense copy's directory name (<gguf sha256 prefix>-tf<version>-<dtype>) with its embedded model's name."""
    if section == "dense":
        for spec in EMBEDDED_MODELS.values():
            if name.startswith(spec.sha256[:16] + "-"):
                return f"{spec.name} {name.rsplit('-', 1)[-1]} ({name})"
    return name


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache, by section and name; temporaries of dead processes are removed first."""
    root = cache_dir() if root is None else root
    entries = []
    for section in SECTIONS:
        folder = root / section
        if not folder.is_dir():
            continue
        remove_dead_temporaries(folder)
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue  # locks and temporaries, not entries
            entries.append(CacheEntry(section, _label(section, path.name), path, _size(path)))
    return entries


def clear_cache(sections: list[str] | None = None, root: Path | None = None) -> list[CacheEntry]:
    """Delete the given sections (default: all) and return what was removed."""
    removed = [e for e in cache_entries(root) if sections is None or e.section in sections]
    for entry in removed:
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
    return removed


def _human(n: int) -> str:
    """1.2 GB, 540 MB, 12 kB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lllm cache`."""
    parser.add_argument("action", choices=("list", "size", "clear"), nargs="?", default="size",
                        help="list every entry, show the size per section (default), or delete")
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append",
                        help="only this section (repeatable; default: all)")


def run(args: argparse.Namespace) -> int:
    """List, size or clear the cache."""
    root = cache_dir()
    if args.action == "clear":
        removed = clear_cache(args.section, root)
        print(f"removed {len(removed)} entries, {_human(sum(e.bytes for e in removed))}, from {root}")
        return 0
    entries = [e for e in cache_entries(root) if args.section is None or e.section in args.section]
    print(f"cache {root}")
    for section, what in SECTIONS.items():
        if args.section is not None and section not in args.section:
            continue
        mine = [e for e in entries if e.section == section]
        print(f"{section:8} {_human(sum(e.bytes for e in mine)):>9}  {len(mine):3d} entries  ({what})")
        if args.action == "list":
            for entry in mine:
                print(f"         {_human(entry.bytes):>9}  {entry.name}")
    print(f"total    {_human(sum(e.bytes for e in entries)):>9}")
    return 0
