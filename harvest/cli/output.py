"""The output folder of `harvest run`: what it may be, and getting it ready.

output.path is a local folder or an object-store URL (harvest.store.location). It must be absent,
empty or a harvest run folder: harvest never writes into, or deletes, anything else.
"""

from __future__ import annotations

import os
from pathlib import Path

from harvest.cli.config import ConfigError, RunConfig, differing_keys
from harvest.store.format import StoreLayout
from harvest.store.location import URL, StoreError
from harvest.store.objectstore import files_for
from harvest.store.runfolder import read_run_metadata


def check_output(out: Path | URL) -> None:
    """output.path must be absent, empty or a harvest run folder: never touch anything else,
    --overwrite included (a typo like output.path=outputs must not wipe every other run).
    It must also be creatable and writable, checked before any work or deletion."""
    if isinstance(out, URL):
        return _check_remote_output(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.path {str(out)!r} is a file")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output.path {str(out)!r} lies under the file {str(existing)!r}; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output.path {str(out)!r}: {str(existing)!r} is not writable; choose another path")
    layout = StoreLayout(out)
    if out.is_dir() and any(not layout.is_entry(p.name) for p in out.iterdir()):
        raise _not_a_run(out)


def _not_a_run(out) -> ConfigError:
    return ConfigError(
        f"{out} exists and is not a harvest run folder; harvest will neither write into "
        f"nor delete it (--overwrite included): choose another output.path"
    )


def _check_remote_output(out: URL) -> None:
    """The object-store twin of check_output: the backend is installed, the bucket exists, the store
    answers, and the prefix is empty or a run folder. (Write permission shows at the first PUT.)"""
    try:
        files = files_for(out)
    except StoreError as e:
        raise ConfigError(f"output.path {e}") from None
    layout = StoreLayout(out)
    try:
        if not files.bucket_exists(out):
            bucket = out.split("://", 1)[1].split("/", 1)[0]
            raise ConfigError(
                f"output.path {out}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                f"create it or choose another output.path"
            )
        if files.is_file(out):
            raise ConfigError(f"output.path {str(out)!r} is an object, not a folder")
        entries = files.entries(out)
    except ConfigError:
        raise
    except Exception as e:  # credentials, endpoint, network: the store's own words, in one line
        detail = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"output.path {out}: cannot reach it ({type(e).__name__}: {detail}); check the credentials and the "
            f"endpoint (for S3: AWS_ENDPOINT_URL, AWS_PROFILE or AWS_ACCESS_KEY_ID)"
        ) from None
    if any(not layout.is_entry(p.name) for p, _ in entries):
        raise _not_a_run(out)


def prepare_output(out: Path | URL, cfg: RunConfig, overwrite: bool) -> None:
    """Refuse to mix runs. Called with the run lock held, so overwrite keeps the locks and leases."""
    layout = StoreLayout(out)
    files = layout.files
    if overwrite:
        for p, _ in files.entries(out):
            if not layout.is_lock(p.name):
                files.remove(p)
    elif files.is_file(layout.run_json):
        diff = differing_keys(read_run_metadata(out).get("config", {}), cfg)
        if diff:
            raise ConfigError(
                f"{out} holds a run with a different config ({', '.join(diff)}); use another output.path or --overwrite"
            )


def last_session_start(out) -> str | None:
    """The start time of the last session recorded in RUN/run.json, or None without one."""
    layout = StoreLayout(out)
    if not layout.files.is_file(layout.run_json):
        return None
    sessions = read_run_metadata(out).get("sessions") or [{}]
    return sessions[-1].get("started")
