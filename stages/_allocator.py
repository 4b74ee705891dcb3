"""Keep freed memory in the process: glibc ``mallopt`` thresholds against per-batch page-fault churn.

The demo's profile (2-core CPU) showed 40 % of its CPU time in the kernel and ~130 million minor page faults.
The cause was glibc's defaults, not the science: every array above the *mmap threshold* (128 KiB, adapted
upwards only up to 32 MiB) is its own ``mmap``, returned to the OS with ``munmap`` when freed, and the heap
top is trimmed back to the OS above the *trim threshold* — so each forward batch, rendered image block and
activation chunk of the same size faulted its pages in again, zero-filled by the kernel, batch after batch.

:func:`tune_allocator` changes three settings once per process (the pipeline calls it in the main process
and in every worker task): no allocation is served by its own ``mmap`` (``M_MMAP_MAX = 0``; glibc's dynamic
threshold stops at 32 MiB, and a shard's activations or label maps are larger), the mmap threshold is set to
its maximum for the allocations that still could, and freed memory at the heap top is kept up to 1 GiB.
So freed batch buffers stay mapped for the next batch. Peak memory is unchanged (the same arrays are alive
at once); what is no longer done is returning and re-faulting it (a probe of alternating 16/48 MiB arrays:
12,800 minor faults → 2,100). On anything but glibc it does nothing. It never changes a result.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["tune_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: glibc's ``mallopt`` parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: allocations up to this size come from the heap (32 MiB: glibc's maximum on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the heap top is returned to the OS only above this
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        # the process's own symbols (libc is loaded): ctypes.util.find_library would spawn `ldconfig -p`
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(bool(mallopt(param, value)) for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_MMAP_MAX, 0)))
    return _applied
