"""corral's two glibc malloc settings (backend/memory.py), each checked in a fresh interpreter:
the arena cap for long-running processes, and the trim after an unload that hands freed
buffers back to the OS. Both are no-ops on other C libraries, where these tests skip."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only (not this C library)")

LIBC = textwrap.dedent("""
    import ctypes, ctypes.util, tempfile, threading
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
""")

COUNT_ARENAS = LIBC + textwrap.dedent("""
    from corral.backend.memory import limit_malloc_arenas
    if LIMIT:
        limit_malloc_arenas()
    held, barrier = [], threading.Barrier(8)
    def worker():
        held.append(libc.malloc(4096))  # a thread's first malloc picks (or makes) its arena
        barrier.wait()                   # all alive at once, so none inherits another's arena
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        stream = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        print(open(f.name).read().count("<heap nr="))
""")


def arenas(limit: bool, env_cap: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env_cap is not None:
        env["MALLOC_ARENA_MAX"] = env_cap
    script = f"LIMIT = {limit}\n" + COUNT_ARENAS
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_long_running_process_keeps_two_arenas_however_many_threads_allocate() -> None:
    assert arenas(limit=False) > 2  # without the cap, each new thread gets an arena of its own
    assert arenas(limit=True) == 2


def test_an_operators_malloc_arena_max_wins_over_the_cap() -> None:
    assert arenas(limit=True, env_cap="4") == 4


def test_return_free_memory_hands_freed_heap_pages_back() -> None:
    script = LIBC + textwrap.dedent("""
        import psutil
        from corral.backend.memory import return_free_memory
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)  # as glibc does itself after freeing a big mmapped block
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
