"""Where a run folder lives: a local folder (a `Path`) or an object store (a `URL`: s3://, gs://,
memory://), and the file operations on a local folder (`LocalFiles`; the object-store twin is
`harvest.store.objectstore.RemoteFiles`, and `objectstore.files_for(path)` picks either).

Local folders keep what makes them safe on a POSIX disk: write to a temporary name, fsync, rename.
This module imports only the standard library, so `harvest.store.format` stays a light import.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from harvest import failpoints
from harvest.errors import HarvestError

TMP_MARK = ".tmp-"  # every temporary file or folder carries it: `<final name>.tmp-<pid>-<hex>`
READ_BLOCK = 8 << 20  # bytes per read of a whole-file stream (LocalFiles.blocks, RemoteFiles.blocks)


class StoreError(HarvestError, RuntimeError):
    """A malformed record, an inconsistent run folder, or a run folder that cannot be reached."""


class PreconditionFailed(StoreError):
    """A conditional write found the object other than expected (it exists, or another wrote it)."""


class URL(str):
    """An object-store location, `s3://bucket/runs/demo`: a string that joins like a Path."""

    def __new__(cls, value: str):
        return super().__new__(cls, value.rstrip("/") if not value.endswith("://") else value)

    def __truediv__(self, other: Any) -> URL:
        return URL(f"{self if self.endswith('/') else self + '/'}{str(other).strip('/')}")

    @property
    def protocol(self) -> str:
        return self.split("://", 1)[0]

    @property
    def name(self) -> str:
        return self.split("://", 1)[1].rsplit("/", 1)[-1]

    @property
    def parent(self) -> URL:
        proto, rest = self.split("://", 1)
        return URL(f"{proto}://{rest.rsplit('/', 1)[0] if '/' in rest else ''}")

    def with_name(self, name: str) -> URL:
        return self.parent / name

    def relative_to(self, other: str) -> PurePosixPath:
        prefix = str(other).rstrip("/") + "/"
        if not self.startswith(prefix):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self[len(prefix) :])


def as_root(root: str | os.PathLike) -> Path | URL:
    """A run folder given as a path or a URL -> Path (local, file:// included) or URL (anything else)."""
    if isinstance(root, URL):
        return root
    s = os.fspath(root)
    if "://" not in s:
        return Path(s)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return URL(s)


def is_remote(path: Any) -> bool:
    return isinstance(path, URL)


# ---------------------------------------------------------------- local folders


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath), directory=True)


def tmp_path(path: Path) -> Path:
    """A unique temporary sibling of `path`, for write-then-rename; the resume scan removes leftovers."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, default=json_default) + "\n").encode()


def json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class LocalFiles:
    """A POSIX folder: temp name + fsync + rename for every file that must appear whole."""

    remote = False

    def is_dir(self, p: Path) -> bool:
        return p.is_dir()

    def is_file(self, p: Path) -> bool:
        return p.is_file()

    def exists(self, p: Path) -> bool:
        return p.exists()

    def entries(self, p: Path) -> list[tuple[Path, bool]]:
        """(child, is a folder) for every child of folder p, by name; [] if p is not a folder."""
        return [(c, c.is_dir()) for c in sorted(p.iterdir())] if p.is_dir() else []

    def partials(self, shards_dir: Path) -> list[Path]:
        """`*.partial` files zarr's local store leaves when a writer is killed mid-write."""
        return sorted(shards_dir.rglob("*.partial")) if shards_dir.is_dir() else []

    def file_sizes(self, folder: Path, rels) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for rel in rels:
            try:
                out[rel] = (folder / rel).stat().st_size
            except FileNotFoundError:
                out[rel] = None
        return out

    def list_files(self, folder: Path) -> list[str]:
        """Every file under folder, relative to it."""
        return sorted((Path(d) / n).relative_to(folder).as_posix() for d, _, names in os.walk(folder) for n in names)

    def tree_size(self, folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    def read_bytes(self, p: Path) -> bytes:
        return p.read_bytes()

    def read_many(self, paths: list[Path]) -> list[bytes]:
        return [p.read_bytes() for p in paths]

    def blocks(self, p: Path) -> Iterator[bytes]:
        with open(p, "rb", buffering=0) as f:
            while block := f.read(READ_BLOCK):
                yield block

    def read_tail(self, p: Path, n: int) -> bytes:
        with open(p, "rb") as f:
            f.seek(-n, os.SEEK_END)
            return f.read()

    @contextlib.contextmanager
    def ranges(self, p: Path) -> Iterator[Callable[[int, int], bytes]]:
        """pread(nbytes, offset) on one open file."""
        fd = os.open(p, os.O_RDONLY)
        try:
            yield lambda n, off: os.pread(fd, n, off)
        finally:
            os.close(fd)

    def write_bytes(self, p: Path, data: bytes) -> None:
        """tmp file + rename, no fsync: for caches, which are recomputed if lost."""
        tmp = tmp_path(p)
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def write_stream(self, p: Path, fill: Callable[[BinaryIO], None]) -> None:
        """fill(f) writes the content to a tmp file, then rename, no fsync: for caches too big to hold a
        second copy of in memory (a statistics cache's norms: 4 bytes a row)."""
        tmp = tmp_path(p)
        try:
            with open(tmp, "wb") as f:
                fill(f)
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_json(self, p: Path, obj: Any, fsync: bool = True, failpoint: str | None = None) -> None:
        """tmp file + rename: readers see the old file, the new file, or nothing; never half a file.
        failpoint names the crash points before and after the rename (harvest.failpoints)."""
        tmp = tmp_path(p)
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=json_default)
            f.write("\n")
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if failpoint:
            failpoints.hit(f"{failpoint}.before_rename")
        os.replace(tmp, p)
        if failpoint:
            failpoints.hit(f"{failpoint}.renamed")
        if fsync:
            fsync_path(p.parent, directory=True)

    def remove(self, p: Path) -> None:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def mkdir(self, p: Path) -> None:
        p.mkdir(parents=True, exist_ok=True)

    def move(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def zarr_store(self, p: Path, prefetched: dict | None = None) -> str:
        return str(p)  # the local file system serves metadata faster than a copy would


LOCAL = LocalFiles()


# ---------------------------------------------------------------- local staging of remote shards

STAGING = "harvest-staging"
STAGING_LOCK = ".lock"  # in each staging folder: flocked by its process for as long as it is in use
_STAGING_NEW = ".new-"  # a staging folder being set up, before its lock is held: never cleaned up early
_STAGING_GRACE_S = 24 * 3600.0  # a folder without a lock (an earlier version's, or a crash in setup) this old is stale


@contextlib.contextmanager
def staging_dir() -> Iterator[Path]:
    """A fresh local folder to build one shard in before its upload, removed on exit.

    Its process holds an exclusive flock on `<folder>/.lock` for as long as it is in use; the lock is
    taken before the folder gets its visible name (set up under `.new-…`, then renamed). Stale folders
    (a SIGKILL skips the cleanup) are removed first, so killed runs do not fill the temp disk: exactly
    those whose lock can be taken now. flock is per open file and kernel-wide, so this holds for
    processes of other pid namespaces (containers) sharing the temp folder, where a pid says nothing."""
    import fcntl

    base = Path(tempfile.gettempdir()) / STAGING
    base.mkdir(exist_ok=True)
    _clean_staging(base)
    new = Path(tempfile.mkdtemp(prefix=f"{_STAGING_NEW}{os.getpid()}-", dir=base))
    folder = base / new.name[len(_STAGING_NEW) :]
    fd = os.open(new / STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # no one waits on a `.new-` folder: immediate
        try:
            os.rename(new, folder)  # the lock (an inode's) moves with it
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # still locked: no one else removes it meanwhile
    finally:
        os.close(fd)


def _clean_staging(base: Path) -> None:
    """Remove the staging folders no live process holds (the lock can be taken without waiting)."""
    import fcntl

    for d in base.iterdir():
        try:
            fd = os.open(d / STAGING_LOCK, os.O_RDONLY)
        except FileNotFoundError:  # being set up, or left by an earlier version or a crash during setup
            with contextlib.suppress(OSError):
                if d.is_dir() and time.time() - d.stat().st_mtime > _STAGING_GRACE_S:
                    shutil.rmtree(d, ignore_errors=True)
            continue
        except OSError:  # another user's, or not a folder
            continue
        try:
            if d.name.startswith(_STAGING_NEW) and time.time() - d.stat().st_mtime <= _STAGING_GRACE_S:
                continue  # its lock file may exist a moment before its lock is taken
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: a live process (of any pid namespace) uses it
            continue
        else:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
