"""The glibc call behind an unload (backend/memory.py): `malloc_trim` hands freed heap pages
back to the OS, checked in a fresh interpreter. A no-op on other C libraries, where the test
skips."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only (not this C library)")


def test_return_free_memory_hands_freed_heap_pages_back() -> None:
    script = textwrap.dedent("""
        import ctypes, ctypes.util
        import psutil
        from corral.backend.memory import return_free_memory
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        M_MMAP_THRESHOLD = -3
        # what glibc does itself after freeing a big mmapped block (it stops at 32 MiB)
        assert libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
        blocks = [libc.malloc(1 << 20) for _ in range(200)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks[:-1]:  # the last one pins the heap's top, so free() alone trims nothing
            libc.free(b)
        rss = lambda: psutil.Process().memory_info().rss
        before = rss()
        return_free_memory()
        print((before - rss()) >> 20)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 150  # MiB of the 199 freed

