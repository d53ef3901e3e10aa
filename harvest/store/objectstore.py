"""Run folders on object stores (s3://, gs://, memory://, any fsspec filesystem): `RemoteFiles`, the
twin of `harvest.store.location.LocalFiles`, and `files_for(path)`, which picks one for a path.

Object stores have no rename, but a single PUT is atomic: a file there is written in one PUT under
its final name, and the commit record, written last, is still what makes a shard exist
(docs/FORMAT.md, "Object storage"). fsspec and its backend (s3fs, gcsfs) are imported when the first
URL is used, so local runs never need them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from harvest import failpoints
from harvest.store.location import (
    LOCAL,
    READ_BLOCK,
    URL,
    LocalFiles,
    PreconditionFailed,
    StoreError,
    json_bytes,
)

# the package (and harvest extra) that gives fsspec each protocol
_BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_BUCKETS = ("s3", "s3a", "gs", "gcs")  # protocols whose first path component is a bucket
_CONDITIONAL = ("s3", "s3a")  # stores whose PUT takes If-None-Match / If-Match (s3fs passes them through)
# Listings are never cached: other processes add shards and commit records while we read. s3fs's
# max_concurrency > 1 sends a HEAD before every whole-object GET (to split big ones): a shard is dozens
# of small objects, read concurrently anyway, so the HEADs would double the round trips.
_OPTIONS = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}


def storage_options(protocol: str) -> dict:
    return {"use_listings_cache": False, **_OPTIONS.get(protocol, {})}


def files_for(path: Path | URL) -> LocalFiles | RemoteFiles:
    """The file operations for `path`'s kind of storage."""
    return _remote(path) if isinstance(path, URL) else LOCAL


class RemoteFiles:
    """An fsspec filesystem (s3fs, gcsfs, memory): whole-object PUTs, listings, ranged GETs.

    Endpoints and credentials come from the backend's own configuration (for S3: AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws; read by botocore)."""

    remote = True

    def __init__(self, protocol: str):
        import fsspec

        self.protocol = protocol
        self.conditional = protocol in _CONDITIONAL
        try:
            self.fs = fsspec.filesystem(protocol, **storage_options(protocol))
        except ImportError:
            package, extra = _BACKENDS.get(protocol, (f"the fsspec backend of {protocol}://", None))
            hint = f"pip install 'harvest[{extra}]'" if extra else "see fsspec's list of implementations"
            raise StoreError(f"install {package} to use {protocol}:// URLs ({hint})") from None
        except ValueError as e:  # fsspec: "Protocol not known"
            raise StoreError(
                f"{protocol}:// is not a storage fsspec knows ({e}); give a local path or an s3://, gs:// or "
                f"memory:// URL"
            ) from None

    def _p(self, url: URL) -> str:
        from fsspec.core import strip_protocol

        return strip_protocol(str(url))

    def bucket_exists(self, url: URL) -> bool:
        """For stores with buckets, whether url's bucket exists; True elsewhere."""
        if self.protocol not in _BUCKETS:
            return True
        return self.fs.exists(self._p(url).split("/", 1)[0])

    def is_dir(self, p: URL) -> bool:
        return self.fs.isdir(self._p(p))

    def is_file(self, p: URL) -> bool:
        return self.fs.isfile(self._p(p))

    def exists(self, p: URL) -> bool:
        return self.fs.exists(self._p(p))

    def entries(self, p: URL) -> list[tuple[URL, bool]]:
        try:
            found = self.fs.ls(self._p(p), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self._p(p).rstrip("/")
        out = {}
        for e in found:
            name = e["name"].rstrip("/")
            if name != base:  # s3fs lists a file as itself
                out[name.rsplit("/", 1)[-1]] = e["type"] == "directory"
        return [(p / name, is_dir) for name, is_dir in sorted(out.items())]

    def partials(self, shards_dir: URL) -> list[URL]:
        return []  # shards are built in a local staging folder, never by zarr on the store

    def _sizes(self, folder: URL) -> dict[str, int]:
        base = self._p(folder).rstrip("/") + "/"
        try:
            found = self.fs.find(self._p(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(base) :]: int(v["size"]) for k, v in found.items() if k.startswith(base)}

    def file_sizes(self, folder: URL, rels) -> dict[str, int | None]:
        sizes = self._sizes(folder)  # one listing for the whole shard, not a HEAD per file
        return {rel: sizes.get(rel) for rel in rels}

    def list_files(self, folder: URL) -> list[str]:
        return sorted(self._sizes(folder))

    def tree_size(self, folder: URL) -> int:
        return sum(self._sizes(folder).values())

    def read_bytes(self, p: URL) -> bytes:
        return self.fs.cat_file(self._p(p))

    def read_many(self, paths: list[URL]) -> list[bytes]:
        """Concurrent GETs (one round trip each, overlapped): commit records at open."""
        if not paths:
            return []
        # cat_ranges, not cat: cat first HEADs every path (to expand globs), doubling the round trips
        got = self.fs.cat_ranges([self._p(p) for p in paths], None, None, on_error="return")
        for v in got:
            if isinstance(v, BaseException):
                raise v
        return got

    def blocks(self, p: URL) -> Iterator[bytes]:
        with self.fs.open(self._p(p), "rb", block_size=READ_BLOCK, cache_type="none") as f:
            while block := f.read(READ_BLOCK):
                yield block

    def read_tail(self, p: URL, n: int) -> bytes:
        size = self.fs.size(self._p(p))
        return self.fs.cat_file(self._p(p), start=max(size - n, 0), end=size)

    @contextlib.contextmanager
    def ranges(self, p: URL) -> Iterator[Callable[[int, int], bytes]]:
        path = self._p(p)
        yield lambda n, off: self.fs.cat_file(path, start=off, end=off + n)

    def write_bytes(self, p: URL, data: bytes) -> None:
        self.fs.pipe_file(self._p(p), data)  # one PUT: the object appears whole or not at all

    def write_stream(self, p: URL, fill: Callable[[BinaryIO], None]) -> None:
        """fill(f) writes the content to a local temporary file, then one upload (a single PUT, or for
        big files a multipart upload, which also appears whole or not at all): never a second copy of
        the content in memory."""
        with tempfile.NamedTemporaryFile(prefix="harvest-upload-") as f:
            fill(f)
            f.flush()
            self.fs.put_file(f.name, self._p(p))

    def write_json(self, p: URL, obj: Any, fsync: bool = True, failpoint: str | None = None) -> None:
        """One PUT. The failpoints keep their local names: before_rename is just before the PUT,
        renamed just after it."""
        data = json_bytes(obj)
        if failpoint:
            failpoints.hit(f"{failpoint}.before_rename")
        self.write_bytes(p, data)
        if failpoint:
            failpoints.hit(f"{failpoint}.renamed")

    def remove(self, p: URL) -> None:
        try:
            self.fs.rm(self._p(p), recursive=True)
        except FileNotFoundError:
            pass

    def mkdir(self, p: URL) -> None:
        pass  # object stores have no folders: a prefix exists while an object is under it

    def move(self, src: URL, dst: URL) -> None:
        """Copy, then delete (no rename on an object store): a crash between leaves both copies."""
        rels = self.list_files(src) if self.is_dir(src) else None
        if rels is None:
            self.fs.copy(self._p(src), self._p(dst))
        else:
            self.fs.copy([self._p(src / r) for r in rels], [self._p(dst / r) for r in rels])
        self.remove(src)

    def upload(self, local: Path, dst: URL, rels: list[str]) -> None:
        """Local files (relative paths under `local`) to the same names under dst, concurrently."""
        self.fs.put([str(local / r) for r in rels], [self._p(dst / r) for r in rels])

    def zarr_store(self, p: URL, read_only: bool = True, prefetched: dict[str, bytes] | None = None):
        """A zarr store over prefix p. prefetched: relative key -> bytes already read (a shard's zarr.json
        files, just checksummed at open), served from memory instead of fetched a second time."""
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(str(p), storage_options=storage_options(self.protocol), read_only=read_only)
        return _prefetched_store_class()(store, prefetched) if prefetched else store

    # ------------------------------------------------------------ conditional writes (leases)

    def read_tagged(self, p: URL) -> tuple[bytes, str]:
        """(content, version tag): the ETag where PUTs are conditional, else a hash of the content."""
        if self.conditional:
            tag = self.fs.info(self._p(p))["ETag"]  # read first: a later change makes a put_if_match fail
            return self.read_bytes(p), tag
        data = self.read_bytes(p)
        return data, hashlib.sha256(data).hexdigest()

    def put_if_absent(self, p: URL, data: bytes) -> str:
        """Create p with data, or raise PreconditionFailed if it exists. -> version tag.
        Atomic on S3 (If-None-Match: *); elsewhere exclusive-create mode or check-then-write."""
        try:
            if self.conditional:
                return self.fs.pipe_file(self._p(p), data, mode="create")["ETag"]
            if self.exists(p):
                raise FileExistsError(str(p))
            self.fs.pipe_file(self._p(p), data, mode="create")
        except FileExistsError:
            raise PreconditionFailed(f"{p} exists") from None
        except OSError as e:
            if self.conditional and _failed_condition(e):  # 409: another conditional write to p in flight
                raise PreconditionFailed(f"{p} is being written by another process") from None
            raise
        return self._confirm(p, data)

    def put_if_match(self, p: URL, data: bytes, tag: str) -> str:
        """Replace p only if it still has version `tag`, else raise PreconditionFailed. -> new tag.
        Atomic on S3 (If-Match); elsewhere compare-then-write, then read back."""
        if self.conditional:
            try:
                return self.fs.pipe_file(self._p(p), data, IfMatch=tag)["ETag"]
            except (OSError, ValueError) as e:
                if isinstance(e, FileNotFoundError) or _failed_condition(e):
                    raise PreconditionFailed(f"{p} was changed by another process") from None
                raise
        try:
            current = self.read_bytes(p)
        except FileNotFoundError:
            raise PreconditionFailed(f"{p} was deleted by another process") from None
        if hashlib.sha256(current).hexdigest() != tag:
            raise PreconditionFailed(f"{p} was changed by another process")
        self.write_bytes(p, data)
        return self._confirm(p, data)

    def remove_if_match(self, p: URL, tag: str) -> None:
        """Delete object p only if it still has version `tag`, else raise PreconditionFailed; a missing p
        is no error. S3: one DELETE with If-Match (AWS since 2025-09; a store that ignores the header
        deletes unconditionally, and one that refuses it gets a plain DELETE). Elsewhere compare, then
        delete: a write between the two is lost."""
        if self.conditional:
            bucket, _, key = self._p(p).partition("/")
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                if _failed_condition(e):
                    raise PreconditionFailed(f"{p} was changed by another process") from None
                if not _unsupported(e):
                    raise
                self.remove(p)  # a store without conditional deletes
            finally:
                self.fs.invalidate_cache(self._p(p))
            return
        try:
            current = self.read_bytes(p)
        except FileNotFoundError:
            return
        if hashlib.sha256(current).hexdigest() != tag:
            raise PreconditionFailed(f"{p} was changed by another process")
        self.remove(p)

    def _confirm(self, p: URL, data: bytes) -> str:
        """Read back what we wrote: without conditional PUTs, this is how a lost race shows."""
        back = self.read_bytes(p)
        if back != data:
            raise PreconditionFailed(f"{p} was written by another process at the same time")
        return hashlib.sha256(back).hexdigest()


_CONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict")
_UNSUPPORTED_CODES = ("NotImplemented", "InvalidArgument", "InvalidRequest", "400", "501")


def _error_code(e: BaseException) -> str | None:
    """botocore's error code of an S3 error as s3fs raises it (an OSError whose __cause__ is the
    ClientError), or None for any other error."""
    for err in (e.__cause__, e):
        code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code")
        if code is not None:
            return str(code)
    return None


def _failed_condition(e: BaseException) -> bool:
    """Whether a conditional request failed on its condition: 412 PreconditionFailed, or 409
    ConditionalRequestConflict (another conditional write to the same key in flight)."""
    code = _error_code(e)
    if code is not None:
        return code in _CONDITION_CODES
    text = str(e).lower().replace("-", "")
    return "precondition" in text or "conditionalrequestconflict" in text


def _unsupported(e: BaseException) -> bool:
    """Whether the store refused a request's conditional header as unknown (an S3-compatible store)."""
    code = _error_code(e)
    if code is not None:
        return code in _UNSUPPORTED_CODES
    return getattr(e, "errno", None) in (errno.EINVAL, errno.ENOSYS)


@functools.cache
def _prefetched_store_class():
    """Defined on first use: zarr is imported only when a store is read."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.storage import WrapperStore

    class PrefetchedStore(WrapperStore):
        def __init__(self, store, data: dict[str, bytes] | None = None):
            super().__init__(store)
            self.data = data or {}

        def _with_store(self, store):
            return type(self)(store, self.data)

        async def get(self, key, prototype, byte_range=None):
            data = self.data.get(key)
            if data is None:
                return await super().get(key, prototype, byte_range)
            if isinstance(byte_range, RangeByteRequest):
                data = data[byte_range.start : byte_range.end]
            elif isinstance(byte_range, OffsetByteRequest):
                data = data[byte_range.offset :]
            elif isinstance(byte_range, SuffixByteRequest):
                data = data[-byte_range.suffix :]
            return prototype.buffer.from_bytes(data)

    return PrefetchedStore


_REMOTES: dict[str, RemoteFiles] = {}
_REMOTES_LOCK = threading.Lock()


def _remote(url: URL) -> RemoteFiles:
    with _REMOTES_LOCK:
        if url.protocol not in _REMOTES:
            try:
                _REMOTES[url.protocol] = RemoteFiles(url.protocol)
            except StoreError as e:
                raise StoreError(f"{url}: {e}") from None
        return _REMOTES[url.protocol]
