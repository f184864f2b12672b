"""Process settings that make PyTorch on the CPU fast for atomistic models.

glibc's malloc hands blocks of more than a few MB back to the kernel when they are freed and
maps fresh, zeroed pages the next time: every training step then pays a page fault per 4 KB
of every large activation (for a QM9 batch, ~30% of the step). :func:`tune_allocator` keeps
freed memory inside the process instead (``mallopt``: blocks of up to 32 MB come from the
heap, and the heap is trimmed only above 1 GB free). ``import atomlens`` calls it once; set
``ATOMLENS_TUNE_MALLOC=0`` to leave the allocator alone. The same effect for any process:
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024**2  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1024**3
TOP_PAD = 64 * 1024**2

_tuned: bool | None = None


def tune_allocator(force: bool = False) -> bool:
    """Set glibc malloc to keep freed memory (see the module doc); True if it was set."""
    global _tuned
    if _tuned is not None and not force:
        return _tuned
    _tuned = False
    if os.environ.get("ATOMLENS_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                  and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                  and mallopt(_M_TOP_PAD, TOP_PAD))
    return _tuned


def allocator_environment() -> dict[str, str]:
    """The same glibc settings as environment variables, for another process (benchmarks)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD), "MALLOC_TOP_PAD_": str(TOP_PAD)}
