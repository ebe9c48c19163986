"""Host memory for CPU training: glibc's malloc asked to keep freed memory for the next step.

A training step allocates and frees the same activations, step after step, many of them hundreds of kilobytes to
megabytes. glibc's malloc hands allocations above a threshold out as fresh ``mmap`` pages and returns them to the
kernel when they are freed, and gives back the top of its heap once enough of it is free, so every step writes to
pages the kernel must fault in and zero again: on a small model's CPU step that is a large share of the time
(``benchmarks/bench_recurrence.py --keep-freed-memory`` measures it). With both turned off, freed memory stays in
the process and the next step reuses it; the process keeps the peak it reached instead of shrinking back.

``brt`` does this at start; a program of one's own calls :func:`keep_freed_memory` once, first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the largest threshold glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit systems); larger values are refused
MAX_MMAP_THRESHOLD = 32 * 2**20
NEVER_TRIM = 2**31 - 1  # (an int; glibc takes it as the free bytes at the heap's top that trigger a trim)


def keep_freed_memory() -> bool:
    """Ask the C library's malloc to keep freed memory for reuse: no heap trimming, and ``mmap`` only for single
    allocations above 32 MB. Returns whether it took effect: False off Linux, or with a C library other than glibc
    (musl has no ``mallopt``), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)) and bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD))
