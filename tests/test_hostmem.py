"""harvest.hostmem: freed host memory goes back to the OS (glibc), at most once per interval."""

import platform

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
