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

_BLOCK = 8 << 20


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """One way a shard's files differ from its manifest. path is relative to the shard folder."""

    path: str
    what: str  # "missing" | "size" | "checksum" | "unlisted"
    detail: str

    def describe(self) -> str:
        return f"{self.path}: {self.detail}"


def crc32c_file(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            crc = google_crc32c.extend(crc, block)
    return crc


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
    shard_dir: Path, files: dict[str, list[int]], checksum: Callable[[str], bool], unlisted: bool = False
) -> list[FileProblem]:
    """Compare shard_dir with its manifest: every file present with its size, and the crc32c of the
    files `checksum(rel)` selects. unlisted=True also reports files the manifest does not name."""
    problems = []
    for rel, (size, crc) in files.items():
        p = shard_dir / rel
        try:
            actual = p.stat().st_size
        except FileNotFoundError:
            problems.append(FileProblem(rel, "missing", "file is missing"))
            continue
        if actual != size:
            problems.append(FileProblem(rel, "size", f"{actual} bytes, the commit record says {size}"))
        elif checksum(rel) and crc32c_file(p) != crc:
            problems.append(FileProblem(rel, "checksum", "crc32c differs from the commit record"))
    if unlisted and shard_dir.is_dir():
        for rel in sorted(set(manifest_paths(shard_dir)) - set(files)):
            problems.append(FileProblem(rel, "unlisted", "file is not in the commit record"))
    return problems


def manifest_paths(shard_dir: Path) -> list[str]:
    return sorted(
        (Path(dirpath) / name).relative_to(shard_dir).as_posix()
        for dirpath, _, names in os.walk(shard_dir)
        for name in names
    )
