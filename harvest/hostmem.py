"""Hand freed host memory back to the OS, so a long harvest's peak RSS does not grow with its length.

A harvest frees several MB of host arrays per sequence (prompt activations, records, shard buffers)
from several threads. glibc keeps freed blocks in per-thread arenas and raises its mmap threshold
to the largest block freed, so that memory is reused only partly and RSS creeps up: on random:0.5b
by 0.62 GiB from 100 to 400 tasks, 0.31 GiB with these trims (README, "Peak RSS"). The writer calls
`release()` after each sequence; it runs malloc_trim at most once per `MIN_INTERVAL_S` (about 15 ms
each on a 2 GB heap). Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

MIN_INTERVAL_S = 1.0
_lock = threading.Lock()
_last = [float("-inf")]


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_trim = _load_trim()


def release(force: bool = False) -> bool:
    """Return free heap pages to the OS (glibc's malloc_trim), unless it ran less than MIN_INTERVAL_S
    ago. -> whether it ran."""
    if _trim is None:
        return False
    now = time.monotonic()
    with _lock:
        if not force and now - _last[0] < MIN_INTERVAL_S:
            return False
        _last[0] = now
    _trim(0)
    return True
