"""Keep freed tensor memory in the process heap while an analysis runs (glibc only; elsewhere a no-op).

An analysis allocates and frees thousands of 5–25 MB temporaries (a sweep chunk's activations, a batch of VJP
rows). glibc returns such blocks to the kernel when they are freed at the top of the heap (or were mapped on their
own), and the next tensor of the same size faults every page back in: on these 2-core VMs that was 5–7 s of a
30 s SmolLM2 analysis. Inside `retained_heap()` freed blocks stay in the heap and are reused; on the way out the
heap is trimmed, so the process keeps nothing it does not use.

glibc has no call that reads its thresholds back, and setting one ends its dynamic adjustment; on exit they are
set to the ceiling the dynamic regime itself reaches (blocks up to 32 MiB from the heap, trimming above 64 MiB).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_INSIDE = 256 << 20  # inside, blocks up to 256 MiB come from the heap (a layer's sweep temporaries)
MMAP_AFTER = 32 << 20  # the dynamic regime's ceiling: a block above it is always mapped on its own
TRIM_AFTER = 2 * MMAP_AFTER  # and its trim threshold at that mmap threshold
RETAINED = 2**31 - 1  # inside, trim only above 2 GiB (mallopt takes an int): freed memory is kept for reuse

# a user who tuned the allocator (glibc reads these at start) keeps their settings
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_depth = 0  # nested or concurrent analyses (Dask threads) share one setting: the outermost exit restores it


def _libc():
    """glibc's mallopt/malloc_trim, or None (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


@contextmanager
def retained_heap():
    """Inside: freed blocks up to 256 MiB stay in the heap for the next allocation. On exit: the heap is trimmed."""
    global _depth
    if _LIBC is None or any(os.environ.get(name) for name in USER_SETTINGS) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            if not _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_INSIDE):  # older glibc (2.26) refuses more than 32 MiB
                _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_AFTER)
            _LIBC.mallopt(M_TRIM_THRESHOLD, RETAINED)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_AFTER)
                _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
                _LIBC.malloc_trim(0)
