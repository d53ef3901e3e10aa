"""Named crash points, for the fault suite (docs/RELIABILITY.md): `HARVEST_FAILPOINT=name[@n][:action]`.

The n-th time (default the first) the code passes `hit(name)`, the process dies by SIGKILL
(action `kill`, the default), the call raises ENOSPC (`enospc`), or the process sends itself SIGINT,
SIGTERM or SIGSTOP (`sigint`, `sigterm`, `stop`: frozen while holding its lock), exactly as a power
cut, a full disk, a Ctrl-C or a scheduler would at that line. Unset, a hit costs one environment
lookup; points sit at commit boundaries (a few per shard), never in a per-token loop.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "HARVEST_FAILPOINT"
_SIGNALS = {"kill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "stop": signal.SIGSTOP}
ACTIONS = (*_SIGNALS, "enospc")
_hits: dict[str, int] = {}


def hit(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, action = spec.partition(":")
    target, _, nth = target.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"[failpoint {name}]")
    os.kill(os.getpid(), _SIGNALS[action or "kill"])
