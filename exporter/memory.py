"""glibc's malloc tuned for a process that replaces a few large arrays at every rebuild.

The window's tasks live in a few large arrays (exporter/store.py) that grow by reallocation
and are replaced whole at every rebuild. glibc serves a block above its mmap threshold (128 KiB
by default) from a mapping of its own, given back to the system when freed. But freeing such a
block also raises the threshold to the block's size (up to 32 MiB): after the first rebuild
frees its arrays, the next rebuild's arrays grow inside the heap, where the holes they leave
are not given back. Pinning the threshold at its default keeps every large array in a mapping
(grown in place by ``mremap``). At 10 M rows in the window this took the served exporter's peak
RSS from 139 to 126 MiB (docs/performance.md).

glibc also gives each new thread an arena of its own (up to eight per core), whose free space
no other thread reuses. The exporter's threads (the refresh's, the server's) allocate under
Python's lock almost always, so they gain nothing from separate arenas: with one, the served
exporter's peak RSS at 10 M rows fell from 109.9, 110.0 and 110.3 to 108.3, 108.3 and 108.6 MiB.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # <malloc.h>
M_ARENA_MAX = -8
THRESHOLD = 128 * 1024  # glibc's default; pinning it turns the dynamic raise off


def tune_malloc() -> None:
    """Pin the mmap threshold and keep to one arena, each unless the environment sets it;
    called before anything large is allocated and before any thread starts."""
    pin_mmap_threshold()
    one_arena()


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (unless the environment sets it); True if pinned."""
    return _mallopt(M_MMAP_THRESHOLD, THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "mmap_threshold")


def one_arena() -> bool:
    """One malloc arena for every thread (unless the environment sets it); True if set."""
    return _mallopt(M_ARENA_MAX, 1, "MALLOC_ARENA_MAX", "arena_max")


def _mallopt(param: int, value: int, variable: str, tunable: str) -> bool:
    """Set a glibc malloc parameter unless the operator set it (the environment variable, or
    the tunable in ``GLIBC_TUNABLES``); True if set, False too where malloc is not glibc's."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # not glibc (musl, macOS)
        return False
    if variable in os.environ or f"malloc.{tunable}" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the operator's choice
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False
