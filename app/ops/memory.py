"""Process memory: large freed buffers go back to the operating system at once; an ordinary
upload's buffers are reused without faulting their pages in again."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameter numbers (malloc.h: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 4 << 20
KEPT_FREE_TOP_BYTES = 16 << 20


def return_large_blocks_to_the_os() -> bool:
    """Have glibc serve every allocation of 4 MiB or more with its own mmap, so that freeing a
    full-size decoded image or a large upload gives the memory back to the OS at once, and keep up
    to 16 MiB free at the top of each heap, so that smaller buffers are reused warm.

    By default glibc raises the mmap threshold up to 32 MiB as large blocks are freed, after which
    decode buffers come from per-thread heaps that keep their pages: on the worst-case mix of
    uploads (measured 2026-11, docs/PERFORMANCE.md, "Memory"), a fixed threshold took peak RSS
    from 0.98-1.23 GiB to 0.64 GiB, and from 623 MiB to 135 MiB once idle again. A fixed threshold
    also freezes the trim threshold at 128 KiB, and the first fixed threshold, 1 MiB, made every
    2500x2048 JPEG upload's half-scale decode (1.3 MB) a fresh mapping: about 700 page faults and
    4 ms of CPU per upload on the development machine. With these two figures a JPEG upload
    allocates nothing that faults. Returns False where the C library has no `mallopt` (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    trimmed = mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_TOP_BYTES)
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) and trimmed)
