"""harvest.hostmem: freed host memory goes back to the OS (glibc), at most once per interval."""

import platform
import subprocess
import sys

import numpy as np
import pytest

from harvest import hostmem

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_release_returns_freed_heap_holes_to_the_os():
    # freeing one large mmapped block raises glibc's mmap threshold past it, so the 1 MB blocks below come
    # from the heap; keeping every tenth pins the heap, and the freed 90% stays resident until a trim
    big = np.ones(16 * 2**20 // 8)  # under glibc's 32 MB ceiling for the threshold
    del big
    blocks = [np.ones(2**20 // 8) for _ in range(300)]  # 300 MB, written
    kept = blocks[::10]
    del blocks
    before = rss_mb()
    assert hostmem.release(force=True)
    after = rss_mb()
    assert before - after > 100, (before, after)
    assert sum(float(b[0]) for b in kept) == len(kept)


def test_release_runs_at_most_once_per_interval():
    assert hostmem.release(force=True)
    assert not hostmem.release()  # just ran
    assert hostmem.release(force=True)


ARENA_PROBE = """
import ctypes, sys, threading
from harvest import hostmem
if sys.argv[1] == "limit":
    assert hostmem.limit_arenas(2)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
start, held = threading.Barrier(8), []
def work():  # each thread's first malloc takes an arena: its own, unless the limit is reached
    start.wait()
    held.append(libc.malloc(1 << 16))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
f = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
"""


@pytest.mark.parametrize("mode", ["default", "limit"])
def test_limit_arenas_caps_the_heaps_threads_take(tmp_path, mode):
    """glibc gives each new thread an arena of its own (up to 8 per core); after limit_arenas(2), eight
    threads share at most two (malloc_info lists one <heap> per arena)."""
    out = tmp_path / "info.xml"
    subprocess.run([sys.executable, "-c", ARENA_PROBE, mode, str(out)], check=True, timeout=120)
    heaps = out.read_text().count("<heap nr=")
    assert heaps <= 2 if mode == "limit" else heaps > 2, heaps
