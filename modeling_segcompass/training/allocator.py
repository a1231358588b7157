"""Keep freed memory in the process for the next step (glibc's malloc, Linux).

A training step on a CPU allocates and frees the same large tensors every step. glibc serves
a block of 128 KiB or more with its own `mmap` and hands it back to the kernel when freed,
and gives back the top of the heap past 128 KiB, so the next step takes page faults on
fresh pages again (system time, not compute). `keep_freed_memory` raises both thresholds
(`mallopt`), as the environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
would at start-up. It changes no number a model computes; the process keeps its peak
memory instead of returning it between steps.

`segcompass` commands, the demo's processes and the benchmarks call it; a Python training
script can call it once at start. SEGCOMPASS_KEEP_FREED_MEMORY=0 in the environment turns it
off everywhere (to compare, or where memory must go back between steps).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

#: mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap: glibc's largest accepted value on 64-bit
#: (HEAP_MAX_SIZE / 2); larger blocks (a SAM-size activation) still use mmap
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: free memory at the top of the heap is kept up to this size
TRIM_THRESHOLD_BYTES = 2**30

#: set to 0 to keep glibc's defaults
ENV_SWITCH = "SEGCOMPASS_KEEP_FREED_MEMORY"

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process.

    Returns:
        True where they are set (Linux with glibc), False elsewhere or when
        SEGCOMPASS_KEEP_FREED_MEMORY=0 (nothing changes).
    """
    if "set" in _state:
        return _state["set"]
    _state["set"] = False
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        logger.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    _state["set"] = ok
    return ok


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` set the thresholds in this process."""
    return _state.get("set", False)


__all__ = ["ENV_SWITCH", "freed_memory_kept", "keep_freed_memory"]
