"""File-level integrity of a shard (format version 2): the manifest a commit record carries, and the
checks readers and `harvest verify` run against it.

Every file of a committed shard is listed in its commit record as `relative path -> [size, crc32c]`.
Inside the files, every chunk carries its own crc32c (zarr's `crc32c` codec after compression) and
the shard index carries one too, so a flipped byte in chunk data is caught when that chunk is
decoded. The manifest adds what chunk checksums cannot see: a missing, short or replaced file, and
the small `zarr.json` metadata files (which readers therefore checksum whole when they open a shard).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np

from harvest.store.location import URL
from harvest.store.objectstore import files_for

_BATCH = 64 << 20  # object stores: bytes fetched at once when checksumming many small files


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """One way a shard's files differ from its manifest. path is relative to the shard folder."""

    path: str
    what: str  # "missing" | "size" | "checksum" | "unlisted"
    detail: str

    def describe(self) -> str:
        return f"{self.path}: {self.detail}"


def crc32c_file(path: Path | URL) -> int:
    crc = 0
    for block in files_for(path).blocks(path):
        crc = google_crc32c.extend(crc, block)
    return crc


def _crc32c_files(fs, folder: Path | URL, rels: list[str], sizes: dict, kept: dict) -> list[int]:
    """crc32c of each file. Object stores: files up to _BATCH bytes together are fetched concurrently
    (one round trip each, overlapped: a shard has dozens of small files), and kept[rel] = their bytes;
    larger ones are streamed."""
    if not fs.remote:
        return [crc32c_file(folder / rel) for rel in rels]
    out: dict[str, int] = {}
    batch: list[str] = []

    def flush() -> None:
        data = fs.read_many([folder / r for r in batch])
        kept.update(zip(batch, data))
        out.update(zip(batch, map(crc32c_bytes, data)))
        batch.clear()

    for rel in rels:
        if sizes[rel] > _BATCH:
            out[rel] = crc32c_file(folder / rel)
            continue
        if sum(sizes[r] for r in batch) + sizes[rel] > _BATCH:
            flush()
        batch.append(rel)
    flush()
    return [out[rel] for rel in rels]


def crc32c_bytes(data: bytes | memoryview) -> int:
    # the C extension takes bytes or a contiguous array, not a memoryview: view it without a copy
    return google_crc32c.value(data if isinstance(data, bytes) else np.frombuffer(data, np.uint8))


def manifest(shard_dir: Path) -> dict[str, list[int]]:
    """relative path -> [size, crc32c] for every file under shard_dir, sorted by path."""
    out = {}
    for dirpath, _, files in os.walk(shard_dir):
        for name in files:
            p = Path(dirpath) / name
            out[p.relative_to(shard_dir).as_posix()] = [p.stat().st_size, crc32c_file(p)]
    return dict(sorted(out.items()))


def is_metadata(rel: str) -> bool:
    """zarr.json files: small, and not covered by chunk checksums."""
    return rel == "zarr.json" or rel.endswith("/zarr.json")


def check_files(
    shard_dir: Path | URL,
    files: dict[str, list[int]],
    checksum: Callable[[str], bool],
    unlisted: bool = False,
    fetched: dict[str, bytes] | None = None,
) -> list[FileProblem]:
    """Compare shard_dir (a local folder or an object-store prefix) with its manifest: every file present
    with its size, and the crc32c of the files `checksum(rel)` selects. unlisted=True also reports files
    the manifest does not name. fetched: on an object store, receives the bytes of the checksummed files
    that matched (a reader then opens zarr on exactly those bytes, without fetching them again)."""
    fs = files_for(shard_dir)
    problems = []
    sizes = fs.file_sizes(shard_dir, files)
    to_sum = []
    for rel, (size, _) in files.items():
        actual = sizes[rel]
        if actual is None:
            problems.append(FileProblem(rel, "missing", "file is missing"))
        elif actual != size:
            problems.append(FileProblem(rel, "size", f"{actual} bytes, the commit record says {size}"))
        elif checksum(rel):
            to_sum.append(rel)
    kept: dict[str, bytes] = {}
    for rel, got in zip(to_sum, _crc32c_files(fs, shard_dir, to_sum, sizes, kept)):
        if got != files[rel][1]:
            problems.append(FileProblem(rel, "checksum", "crc32c differs from the commit record"))
        elif fetched is not None and rel in kept:
            fetched[rel] = kept[rel]
    order = {rel: i for i, rel in enumerate(files)}
    problems.sort(key=lambda p: order[p.path])  # in manifest order: readers report the first
    if unlisted and fs.is_dir(shard_dir):
        for rel in sorted(set(fs.list_files(shard_dir)) - set(files)):
            problems.append(FileProblem(rel, "unlisted", "file is not in the commit record"))
    return problems
