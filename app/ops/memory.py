"""Process memory: freed decode buffers go back to the operating system at once."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 1 << 20


def return_large_blocks_to_the_os() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with its own mmap, so that freeing a
    decoded image or an upload gives the memory back to the OS at once.

    By default glibc raises this threshold up to 32 MiB as large blocks are freed, after which
    decode buffers come from per-thread heaps that keep their pages: on the worst-case mix of
    uploads (measured 2026-11, docs/PERFORMANCE.md), peak RSS went from 0.98-1.23 GiB to 0.64 GiB,
    and from 623 MiB to 135 MiB once idle again. Returns False where the C library has no
    `mallopt` (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))
