"""Leases: the lock of a run folder on an object store, where flock does not exist.

Process N of a run holds `RUN/leases/pN.json` (owner token, host, pid, process share, expiry). It is
created with a conditional PUT (If-None-Match: *), renewed by a background thread every quarter of
its lifetime with a PUT conditional on the version it last wrote (If-Match), and deleted when the
process ends (a DELETE conditional on the version read). A live lease held by someone else refuses
the run in one line; an expired one (its process died without deleting it), or one whose process is
gone from this very machine, is taken over with a PUT conditional on the version read. Stores
without conditional PUTs get a write-then-read-back instead, a weaker guarantee; docs/FORMAT.md
("Leases") states exactly what holds where.

A lease fences the writer: before uploading a shard and before writing its commit record, the shard
writer calls `check_held(root)`, which raises if this process's lease lapsed or was taken over.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time

from harvest.store.format import LONE, ProcessShare, StoreLayout
from harvest.store.location import PreconditionFailed, StoreError, alive, json_bytes

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0  # a dead process's lease lapses after this; a live one renews it every quarter of it
_HELD: dict[str, list[Lease]] = {}  # run URL -> the leases this process holds on it
_HELD_LOCK = threading.Lock()


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_namespace() -> str | None:
    """Which pid namespace this process lives in (Linux), so a pid is compared only where it means the
    same process: a container on the same host name has its own."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _dead_here(doc: dict) -> bool:
    """The lease's holder ran on this host, in this pid namespace, and is gone: a crash (SIGKILL, power
    loss of a worker) on this machine, so a resume need not wait for the lease to lapse, as with flock."""
    here = doc.get("host") == socket.gethostname() and doc.get("pid_namespace") == _pid_namespace()
    if not here or doc.get("pid_namespace") is None or not isinstance(doc.get("pid"), int):
        return False
    return not alive(doc["pid"])


def _parse(data: bytes) -> dict | None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("expires"), (int, float)) else None


class Lease:
    """Process `share.index`'s lease on an object-store run folder; a context manager."""

    def __init__(self, layout: StoreLayout, share: ProcessShare = LONE, seconds: float = LEASE_SECONDS):
        self.layout, self.share, self.seconds = layout, share, float(seconds)
        self.files = layout.files
        self.path = layout.lease_path(share.index)
        self.token = secrets.token_hex(8)
        self.tag: str | None = None  # version of the lease object we last wrote
        self.expires = 0.0
        self.lost: str | None = None  # why the lease is no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self, now: float) -> bytes:
        return json_bytes(
            {
                "owner": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_namespace": _pid_namespace(),
                "process": [self.share.index, self.share.count],
                "renewed": now,
                "expires": now + self.seconds,
            }
        )

    # ------------------------------------------------------------ acquire, renew, release

    def acquire(self) -> Lease:
        now = time.time()
        try:
            self.tag = self.files.put_if_absent(self.path, self._doc(now))
        except PreconditionFailed:
            self._take_over(now)
        self.expires = now + self.seconds
        try:
            self._check_others()
        except BaseException:
            self._release()
            raise
        with _HELD_LOCK:
            _HELD.setdefault(str(self.layout.root), []).append(self)
        self._thread = threading.Thread(target=self._renew_loop, name="harvest-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, now: float) -> None:
        try:
            data, tag = self.files.read_tagged(self.path)
        except FileNotFoundError:  # released between our attempt and the read: one more try
            try:
                self.tag = self.files.put_if_absent(self.path, self._doc(now))
                return
            except PreconditionFailed:
                raise StoreError(self._raced()) from None
        doc = _parse(data)
        if doc is not None and doc["expires"] > now and not _dead_here(doc):
            raise StoreError(self._in_use(doc, self.path, ""))
        try:
            self.tag = self.files.put_if_match(self.path, self._doc(now), tag)
        except PreconditionFailed:
            raise StoreError(self._raced()) from None
        who = f"{doc.get('host')} pid {doc.get('pid')}, expired {_utc(doc['expires'])}" if doc else "unreadable"
        log.warning("took over the expired lease %s (%s)", self.path, who)

    def _raced(self) -> str:
        return f"{self.layout.root} is in use by another harvest process (it took {self.path} just now)"

    def _in_use(self, doc: dict, path, why: str) -> str:
        return (
            f"{self.layout.root} is in use by another harvest process ({doc.get('host')} pid {doc.get('pid')}{why}, "
            f"lease {path} valid until {_utc(doc['expires'])}); wait for it to end, or if it died, delete {path} "
            f"or wait until then"
        )

    def _check_others(self) -> None:
        """Every live process of one run must share its process count, else their shard names collide;
        a lone harvest (count 1) owns every index, so it refuses any other live lease. Both of two racing
        processes write their lease before they list the others, so at least one sees the other."""
        for p, is_dir in self.files.entries(self.layout.leases_dir):
            if is_dir or p.name == self.path.name:
                continue
            try:
                doc = _parse(self.files.read_bytes(p))
            except FileNotFoundError:
                continue
            if doc is None or doc["expires"] <= time.time():
                continue
            count = (doc.get("process") or [0, 1])[1]
            if count != self.share.count:
                raise StoreError(
                    self._in_use(doc, p, f", one of {count} processes; every process of a run uses one process count")
                )

    def renew(self) -> None:
        now = time.time()
        self.tag = self.files.put_if_match(self.path, self._doc(now), self.tag)
        self.expires = now + self.seconds

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self.renew()
            except PreconditionFailed:
                self.lost = f"another process replaced {self.path}"
                log.error("lost the lease %s: another process took the run over", self.path)
                return
            except Exception as e:  # noqa: BLE001 - a network error: retried until the lease lapses
                log.warning("could not renew the lease %s (%s: %s); retrying", self.path, type(e).__name__, e)

    def check(self) -> None:
        """Raise unless the lease is still ours with some time left (called before each commit)."""
        why = self.lost
        if why is None and time.time() > self.expires - self.seconds / 8:
            why = f"it was not renewed in time and lapsed at {_utc(self.expires)}"
        if why:
            raise StoreError(
                f"{self.layout.root}: this process lost its lease ({why}); another process may be writing the run: "
                f"stop this one, then run the harvest again"
            )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _HELD_LOCK:
            held = _HELD.get(str(self.layout.root), [])
            if self in held:
                held.remove(self)
        self._release()

    def _release(self) -> None:
        """Delete the lease object if it is still ours (a taken-over lease belongs to its new owner)."""
        if self.lost or self.tag is None:
            return
        try:
            data, tag = self.files.read_tagged(self.path)
            doc = _parse(data)
            if doc is not None and doc.get("owner") == self.token:
                # S3: a DELETE conditional on the version just read, so a lease another process took over
                # since is never deleted; elsewhere compare and delete (docs/FORMAT.md, "Leases")
                self.files.remove_if_match(self.path, tag)
        except (FileNotFoundError, PreconditionFailed):
            pass  # gone, or no longer ours
        except Exception as e:  # noqa: BLE001 - it lapses on its own; never hide the caller's error
            log.warning("could not delete the lease %s (%s); it lapses in %.0f s", self.path, e, self.seconds)
        self.tag = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_held(root) -> None:
    """Raise if any lease this process holds on run folder `root` lapsed or was taken over."""
    with _HELD_LOCK:
        held = list(_HELD.get(str(root), []))
    for lease in held:
        lease.check()
