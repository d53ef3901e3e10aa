"""Per-hook activation statistics, computed in one streaming pass and cached in the run folder.

    st = store.stats("blocks.6.hook_resid_post")       # computed on first use, then read from disk
    st.group("all").scale_factor                       # SAELens: sqrt(d) / E||x||
    st.group("decode").mean, st.group("decode").var    # [d] float64, population variance
    st.norms()                                         # [N] float32 L2 norm of every row
    st.outliers                                        # top-k rows by norm, with their provenance

Groups are "all", "prefill" and "decode". The attention-sink rows (`first_token`) are left out of
every group's moments and quantiles (one per sequence at ~100x the median norm would move the mean
norm and the variance); they are summarised in `first_token` and kept in norms().

Accumulation is chunk by chunk in float64: each chunk gives (count, mean, M2), merged with Chan et
al.'s parallel update, so a store of any size needs O(d) memory (plus 4 bytes per row of norms).

Cache (docs/TRAINING.md): RUN/stats/<hook>.npz (mean/var vectors), RUN/stats/<hook>.norms.npy
([N] float32), then RUN/stats/<hook>.json, written last, which makes the cache valid. It records the
committed shards it was computed from; a store with other shards recomputes. Shards are never touched.
An open store also keeps each hook's statistics in memory (StoreReader.memo), so Store.stats and
the loader's normalisation and outlier filter share one computation or load.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from harvest.store.chunks import ChunkReader
from harvest.store.format import PHASES
from harvest.store.location import URL
from harvest.store.reader import StoreReader
from harvest.store.runfolder import write_json_atomic

__all__ = ["Moments", "GroupStats", "HookStats", "compute_stats", "load_stats", "hook_stats"]

log = logging.getLogger(__name__)
STATS_VERSION = 1
GROUPS = ("all", "prefill", "decode")
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
TOKEN_FIELDS = ("sequence", "position", "phase", "segment", "token_id", "row", "col")


@dataclasses.dataclass(frozen=True)
class Moments:
    """Running moments of a set of rows: count, mean [d] and M2 = sum (x - mean)^2 [d], float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    norm_sum: float  # sum of the rows' L2 norms

    @classmethod
    def empty(cls, d: int) -> Moments:
        return cls(0, np.zeros(d), np.zeros(d), 0.0)

    @classmethod
    def of(cls, x: np.ndarray, norms: np.ndarray) -> Moments:
        """x: [m, d] float64, norms: [m]."""
        mean = x.mean(axis=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0), float(norms.sum()))

    def merge(self, o: Moments) -> Moments:
        # Chan, Golub & LeVeque: exact for any split, stable when the two means differ
        if o.count == 0:
            return self
        if self.count == 0:
            return o
        n = self.count + o.count
        delta = o.mean - self.mean
        mean = self.mean + delta * (o.count / n)
        m2 = self.m2 + o.m2 + delta**2 * (self.count * o.count / n)
        return Moments(n, mean, m2, self.norm_sum + o.norm_sum)


@dataclasses.dataclass(frozen=True)
class GroupStats:
    count: int
    mean: np.ndarray  # [d] float64
    var: np.ndarray  # [d] float64, ddof=0
    mean_norm: float  # E||x||
    scale_factor: float  # sqrt(d) / E||x||: after scaling, E||x|| = sqrt(d)
    median_norm: float
    quantiles: dict  # "q0.99" -> norm

    def summary(self) -> dict:
        return {
            "count": self.count,
            "mean_norm": self.mean_norm,
            "scale_factor": self.scale_factor,
            "median_norm": self.median_norm,
            "quantiles": self.quantiles,
        }


@dataclasses.dataclass(frozen=True)
class HookStats:
    hook: str
    width: int
    num_tokens: int
    groups: dict  # name -> GroupStats
    first_token: dict  # count, median_norm, max_norm, median_ratio (to the "all" median)
    outliers: list  # top-k non-first rows: [{index, norm, ratio, sequence, position, phase, segment, ...}]
    over_factor: dict  # {"factor": k, "count": non-first rows above k x median, "first_token": sinks above it}
    norms_path: Path | URL | None = None
    norms_array: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def group(self, name: str) -> GroupStats:
        if name not in self.groups:
            raise KeyError(f"no statistics group {name!r}; groups: {', '.join(self.groups)}")
        return self.groups[name]

    def norms(self) -> np.ndarray:
        """[N] float32: the L2 norm of every row (first tokens included), in global row order."""
        if self.norms_array is not None:
            return self.norms_array
        return np.load(self.norms_path, mmap_mode="r")

    def outlier_mask(self, factor: float = 10.0) -> np.ndarray:
        """[N] bool: rows whose norm exceeds factor x the median norm of the "all" group."""
        return self.norms() > factor * self.group("all").median_norm


# ---------------------------------------------------------------- computing


def _read_ahead(store: StoreReader, hook: str, workers: int) -> Iterator[tuple]:
    """Yields (unit, [rows, d] logical dtype) in row order, decoding up to 2 x workers chunks ahead."""
    reader = ChunkReader(store, [hook])  # whole chunks straight from the shard files
    logical = store.hook_dtype(hook)
    with ThreadPoolExecutor(workers, thread_name_prefix="harvest-stats") as pool:
        window: collections.deque = collections.deque()
        for u in store.chunk_index(hook):
            window.append((u, pool.submit(reader.read, hook, u)))
            if len(window) > 2 * workers:
                v, f = window.popleft()
                yield v, f.result().view(logical)
        while window:
            v, f = window.popleft()
            yield v, f.result().view(logical)


def compute_stats(
    store: StoreReader, hook: str, top_k: int = 20, outlier_factor: float = 10.0, workers: int = 2
) -> HookStats:
    """One pass over the hook's chunks (float64 accumulators); nothing is written, nothing is memoised."""
    store.check_hook(hook)
    d, N = store.hook_widths[hook], store.num_tokens
    phase, first = store.token_column("phase"), store.token_column("first_token")  # [N]
    norms = np.zeros(N, dtype=np.float32)
    acc = {p: Moments.empty(d) for p in PHASES}
    for u, x in _read_ahead(store, hook, workers):
        g = slice(u.offset + u.start, u.offset + u.stop)
        x = x.astype(np.float64)  # [m, d]
        n = np.sqrt(np.einsum("ij,ij->i", x, x))  # [m]
        norms[g] = n
        for p, code in PHASES.items():
            m = (phase[g] == code) & ~first[g]
            if m.any():
                acc[p] = acc[p].merge(Moments.of(x[m], n[m]))
    acc["all"] = acc["prefill"].merge(acc["decode"])
    masks = {"all": ~first} | {p: (phase == code) & ~first for p, code in PHASES.items()}
    groups = {name: _summarise(acc[name], norms[masks[name]], d) for name in GROUPS}
    median = groups["all"].median_norm
    fn = norms[first]
    first_report = {
        "count": int(first.sum()),
        "median_norm": float(np.median(fn)) if fn.size else float("nan"),
        "max_norm": float(fn.max()) if fn.size else float("nan"),
    }
    first_report["median_ratio"] = first_report["median_norm"] / median if median else float("nan")
    body = np.flatnonzero(~first)
    top = body[np.argsort(-norms[body], kind="stable")[:top_k]]
    cols = {f: store.token_column(f) for f in TOKEN_FIELDS}
    outliers = [
        {
            "index": int(i),
            "norm": float(norms[i]),
            "ratio": float(norms[i] / median) if median else None,
            **{f: int(cols[f][i]) for f in TOKEN_FIELDS},
        }
        for i in top
    ]
    over = {
        "factor": outlier_factor,
        "count": int((norms[body] > outlier_factor * median).sum()),
        "first_token": int((fn > outlier_factor * median).sum()),
    }
    return HookStats(hook, d, N, groups, first_report, outliers, over, norms_array=norms)


def _summarise(m: Moments, norms: np.ndarray, d: int) -> GroupStats:
    if m.count == 0:
        nan = np.full(d, np.nan)
        return GroupStats(
            0, nan, nan.copy(), float("nan"), float("nan"), float("nan"), {f"q{q}": float("nan") for q in QUANTILES}
        )
    qs = np.quantile(norms.astype(np.float64), QUANTILES)
    mean_norm = m.norm_sum / m.count
    return GroupStats(
        m.count,
        m.mean,
        m.m2 / m.count,
        mean_norm,
        float(np.sqrt(d) / mean_norm),
        float(np.median(norms)),
        {f"q{q}": float(v) for q, v in zip(QUANTILES, qs)},
    )


# ---------------------------------------------------------------- cache


def _paths(store: StoreReader, hook: str) -> dict[str, Path | URL]:
    base = store.layout.stats_dir
    return {"json": base / f"{hook}.json", "npz": base / f"{hook}.npz", "norms": base / f"{hook}.norms.npy"}


def fingerprint(store: StoreReader) -> list:
    """What the statistics were computed from: the committed shards."""
    return [[int(r["shard"]), int(r["num_tokens"]), r.get("committed_at")] for r in store.commits]


def save_stats(store: StoreReader, st: HookStats, options: dict | None = None) -> HookStats:
    """Write the cache (vectors first, the JSON last) and return st reading norms from disk (a local
    folder: memory-mapped) or keeping them in memory (an object store)."""
    p, files = _paths(store, st.hook), store.files
    files.mkdir(p["json"].parent)
    vectors = {f"{k}_{g}": getattr(st.groups[g], k) for g in st.groups for k in ("mean", "var")}
    # streamed to a file (local: a tmp file then rename; an object store: a local tmp file then one
    # upload), never built in memory: the norms are 4 bytes a row, 4 GB at 1e9 tokens
    files.write_stream(p["npz"], lambda f: np.savez(f, **vectors))
    files.write_stream(p["norms"], lambda f: np.save(f, st.norms()))
    doc = {
        "format": "harvest-stats",
        "version": STATS_VERSION,
        "fingerprint": fingerprint(store),
        "options": options,
        "hook": st.hook,
        "width": st.width,
        "num_tokens": st.num_tokens,
        "groups": {g: s.summary() for g, s in st.groups.items()},
        "first_token": st.first_token,
        "outliers": st.outliers,
        "over_factor": st.over_factor,
    }
    write_json_atomic(p["json"], doc, fsync=False)  # a lost cache is recomputed, never wrong
    return dataclasses.replace(st, norms_path=p["norms"], norms_array=st.norms() if files.remote else None)


def _npy_view(data: bytes) -> np.ndarray:
    """A .npy file's array as a read-only view of `data` (np.load would copy it: 4 GB more at 1e9 rows)."""
    f = io.BytesIO(data)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shape, fortran, dtype = read_header[np.lib.format.read_magic(f)](f)
    if fortran or dtype.hasobject:
        raise ValueError("unexpected .npy layout")
    return np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=f.tell()).reshape(shape)


def load_stats(store: StoreReader, hook: str, options: dict | None = None) -> HookStats | None:
    """The cached statistics, or None if absent, computed from other shards or with other options."""
    p, files = _paths(store, hook), store.files
    try:
        doc = json.loads(files.read_bytes(p["json"]))
        if (
            doc.get("version") != STATS_VERSION
            or doc.get("fingerprint") != fingerprint(store)
            or (options is not None and doc.get("options") != options)
        ):
            return None
        vec = np.load(io.BytesIO(files.read_bytes(p["npz"])))
        groups = {
            g: GroupStats(
                s["count"],
                vec[f"mean_{g}"],
                vec[f"var_{g}"],
                s["mean_norm"],
                s["scale_factor"],
                s["median_norm"],
                s["quantiles"],
            )
            for g, s in doc["groups"].items()
        }
        # an object store cannot be memory-mapped: its norms are read now ([N] float32, 4 bytes a row)
        norms = _npy_view(files.read_bytes(p["norms"])) if files.remote else None
    except (OSError, ValueError, KeyError):
        return None
    if norms is None and not files.is_file(p["norms"]):
        return None
    return HookStats(
        hook,
        doc["width"],
        doc["num_tokens"],
        groups,
        doc["first_token"],
        doc["outliers"],
        doc["over_factor"],
        norms_path=p["norms"],
        norms_array=norms,
    )


def hook_stats(store: StoreReader, hook: str, recompute: bool = False, **options) -> HookStats:
    """The store's statistics of `hook`: memoised on the open store, else the disk cache if valid, else
    computed and cached on disk (read-only run folders: in memory only). recompute=True ignores both.

    options: compute_stats's top_k, outlier_factor, workers.
    """
    store.check_hook(hook)
    # A cache is valid only for the options it was computed with (the outlier report depends on them);
    # `workers` changes nothing in the result, so it is not part of either key.
    opts = {"top_k": options.get("top_k", 20), "outlier_factor": float(options.get("outlier_factor", 10.0))}

    def load_or_compute() -> HookStats:
        st = None if recompute else load_stats(store, hook, opts)
        if st is None:
            st = compute_stats(store, hook, **options)
            try:
                st = save_stats(store, st, opts)
            except OSError as e:
                log.warning("statistics for %s not cached (%s); keeping them in memory", hook, e)
        return st

    return store.memo(("stats", hook, opts["top_k"], opts["outlier_factor"]), load_or_compute, refresh=recompute)
