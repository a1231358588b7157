"""keep_freed_memory: glibc's thresholds set once per process, off with the switch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from modeling_segcompass.training import allocator

# the module alone (it imports only the standard library): each child starts in 0.1 s
LOAD = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("allocator", {allocator.__file__!r})
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
"""


def _run(code: str, *args: str, **env: str) -> str:
    import os

    result = subprocess.run(
        [sys.executable, "-c", LOAD + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_thresholds_are_set_once_and_the_switch_turns_them_off():
    code = """
        print(allocator.freed_memory_kept(), allocator.keep_freed_memory(),
              allocator.keep_freed_memory(), allocator.freed_memory_kept())
    """
    assert _run(code) == "False True True True"
    assert _run(code, **{allocator.ENV_SWITCH: "0"}) == "False False False False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_in_the_process():
    """With the thresholds set, a freed 8 MiB block is not given back to the kernel: the
    process's resident memory does not drop when it is freed (glibc's default does give it
    back at once, as it serves such a block with its own mmap)."""
    code = """
        import ctypes, os, sys
        if sys.argv[-1] == "keep":
            assert allocator.keep_freed_memory()
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        def resident():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        size = 8 * 2**20
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        before = resident()
        libc.free(block)
        print(int((before - resident()) > size // 2))
    """
    assert (_run(code, "keep"), _run(code, "default")) == ("0", "1")
