"""Large arrays in mappings of their own, so that memory freed at a rebuild goes back (glibc).

The window's tasks live in a few large arrays (exporter/store.py) that grow by reallocation
and are replaced whole at every rebuild. glibc serves a block above its mmap threshold (128 KiB
by default) from a mapping of its own, given back to the system when freed. But freeing such a
block also raises the threshold to the block's size (up to 32 MiB): after the first rebuild
frees its arrays, the next rebuild's arrays grow inside the heap, where the holes they leave
are not given back. Pinning the threshold at its default keeps every large array in a mapping
(grown in place by ``mremap``). At 10 M rows in the window this took the served exporter's peak
RSS from 139 to 126 MiB (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # <malloc.h>
THRESHOLD = 128 * 1024  # glibc's default; pinning it turns the dynamic raise off


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (unless the environment sets it); True if pinned."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # not glibc (musl, macOS)
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "malloc.mmap_threshold" in tunables:
        return False  # the operator's choice
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
