"""Hand freed host memory back to the OS, so a long harvest's peak RSS does not grow with its length.

A harvest frees several MB of host arrays per sequence (prompt activations, records, shard buffers)
from several threads. glibc keeps freed blocks in per-thread arenas and raises its mmap threshold
to the largest block freed, so that memory is reused only partly and RSS creeps up: on random:0.5b
by 0.62 GiB from 100 to 400 tasks, 0.31 GiB with these trims (README, "Peak RSS"). The writer calls
`release()` after each sequence; it runs malloc_trim at most once per `MIN_INTERVAL_S` (about 15 ms
each on a 2 GB heap). `limit_arenas()` (called when a harvest starts) caps glibc's arenas at
`ARENAS`: by default glibc gives each new thread its own arena, up to 8 per core, and the freed blocks
of one arena serve only the threads that use it, so a harvest's threads (XLA's, the writer's and its
compressors') each kept their own partly empty heap. Elsewhere than glibc (macOS, musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

MIN_INTERVAL_S = 1.0
_lock = threading.Lock()
_last = [float("-inf")]


ARENAS = 2  # peak RSS from 100 to 400 tasks on a 3-layer d=896 stand-in: +0.08 GiB with 2, +0.15 with glibc's default
M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc_function(name: str, argtypes: list):
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)  # glibc only
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


_trim = _libc_function("malloc_trim", [ctypes.c_size_t])
_mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])


def limit_arenas(n: int = ARENAS) -> bool:
    """Let glibc create no more than n malloc arenas from now on (threads then share them, and with
    them their freed blocks). -> whether it took effect. No slower on the 0.5B here (README, "Peak RSS")."""
    return _mallopt is not None and bool(_mallopt(M_ARENA_MAX, n))


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
