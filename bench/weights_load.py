"""Safetensors load time and peak memory: safetensors.safe_open next to harvest's hand-written reader.

    .venv/bin/python bench/weights_load.py                    # the real 0.5B folder if present, else synthetic
    .venv/bin/python bench/weights_load.py --synthetic        # also random 0.5B-shaped bf16 and f32 files
    .venv/bin/python bench/weights_load.py --platform gpu     # load onto the GPU (JAX_PLATFORMS=cuda)

Each (source, target dtype, reader) runs in a fresh subprocess, `--repeat` times, the readers
interleaved so that a busy machine slows them alike. The table shows the median load wall time and
CPU time (user + sys of the loading process), and the largest peak RSS (VmHWM). "over base" is the
peak minus the RSS after importing JAX and starting its backend: what loading cost. "params" is
what the loaded arrays take; a loader that made a float32 copy of the whole model would show about
2x the bf16 params more "over base". "anon end" is the private memory left once the reader is
closed (on CPU: the params plus slack); file-backed pages of a memory map count in the peak but
are page cache that the kernel may drop. Files are read once before timing: a warm page cache.

Readers: "hand-written" is harvest.weights.checkpoint.TensorIndex (header parsed and checked by
hand, numpy memmap; widening casts done by JAX after the copy, narrowing ones by numpy before it);
"safe_open (flax)" is the candidate replacement that lost, a minimal copy kept here; "old (numpy
cast)" is harvest's reader before this change, which cast every tensor with numpy on the host.
The real folder is built by ../shared/tools/real-qwen-checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = Path("~/.cache/harvest-fixtures/qwen2.5-coder-0.5b-instruct").expanduser()
SYNTHETIC = Path("/tmp/harvest-bench-weights")
READERS = ("hand-written", "safe_open (flax)", "old (numpy cast)")


# ---- the compared readers (harvest's own is imported from the package) -------------------------
class SafeOpenIndex:
    """COMPARISON ONLY, minimal: the safetensors.safe_open reader this benchmark weighed against ours."""

    def __init__(self, files):
        from safetensors import safe_open

        self.handles = [safe_open(f, framework="flax") for f in files]
        self.where = {name: h for h in self.handles for name in h.keys()}

    def load(self, name, shape, dtype):
        return self.where[name].get_tensor(name).astype(dtype)

    def close(self):
        for h in self.handles:
            h.__exit__(None, None, None)


class OldNumpyCastIndex:
    """COMPARISON ONLY: harvest's reader before this change, which cast with numpy on the host."""

    def __init__(self, files):
        from harvest.weights.checkpoint import TensorIndex

        self.index = TensorIndex(files)

    def load(self, name, shape, dtype):
        import jax.numpy as jnp

        host = self.index.host_view(name, shape)
        return jnp.asarray(host.astype(jnp.dtype(dtype), copy=False))

    def close(self):
        self.index.close()


# ---- one measurement, in a fresh process ------------------------------------------------------
def status_kb(*keys: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0])
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(reader: str, folder: Path, dtype: str) -> None:
    import jax
    import jax.numpy as jnp

    from harvest.engine import params as P
    from harvest.engine.config import ModelConfig
    from harvest.weights.checkpoint import TensorIndex, read_json, resolve_dtype, safetensors_files

    jnp.zeros(1).block_until_ready()  # start the backend before the baseline
    cfg = ModelConfig.from_hf(read_json(folder / "config.json"))
    files, jdtype = safetensors_files(folder), resolve_dtype(dtype)
    base = status_kb("VmRSS")["VmRSS"]
    t0, c0 = time.perf_counter(), cpu_seconds()
    index = {READERS[0]: TensorIndex, READERS[1]: SafeOpenIndex, READERS[2]: OldNumpyCastIndex}[reader](files)
    leaves = {leaf.path: index.load(leaf.hf_name, leaf.shape, jdtype) for leaf in P.iter_specs(cfg)}
    jax.block_until_ready(leaves)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    index.close()
    del index
    end = status_kb("VmHWM", "RssAnon")
    nbytes = sum(x.nbytes for x in leaves.values())
    device = str(next(iter(leaves.values())).devices().pop().platform)
    print(json.dumps(dict(seconds=seconds, cpu=cpu, base_kb=base, hwm_kb=end["VmHWM"], anon_kb=end["RssAnon"],
                          nbytes=nbytes, device=device)))  # fmt: skip


def measure(reader: str, folder: Path, dtype: str, platform: str) -> dict:
    cmd = [sys.executable, __file__, "--child", reader, "--folder", str(folder), "--dtype", dtype]
    env = {**os.environ, "JAX_PLATFORMS": {"cpu": "cpu", "gpu": "cuda"}[platform]}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{reader} on {folder} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- sources ----------------------------------------------------------------------------------
def build_synthetic(stored: str) -> Path:
    """Random weights in the real fixture's shape (Qwen2.5-0.5B, untied), named by the ParamSpec table."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from harvest.engine import params as P
    from harvest.engine.config import ModelConfig, preset_hf_config

    folder = SYNTHETIC / stored
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    hf = {**preset_hf_config("0.5b"), "tie_word_embeddings": False}
    rng = np.random.default_rng(0)
    np_dtype = {"bf16": ml_dtypes.bfloat16, "f32": np.float32}[stored]
    tensors = {
        leaf.hf_name: (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(np_dtype)
        for leaf in P.iter_specs(ModelConfig.from_hf(hf))
    }
    save_file(tensors, str(folder / "model.safetensors.partial"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "model.safetensors.partial").rename(folder / "model.safetensors")
    return folder


def warm(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help=f"a Hugging Face folder (default {REAL} if present)")
    ap.add_argument("--synthetic", action="store_true", help="also measure random 0.5B-shaped bf16 and f32 files")
    ap.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.folder, args.dtype)

    sources = []
    folder = args.folder or (REAL if (REAL / "model.safetensors").is_file() else None)
    if folder is not None:
        sources.append((f"{folder.name} (bf16)" if folder == REAL else folder.name, folder))
    if args.synthetic or folder is None:
        sources += [(f"random 0.5B, stored {s}", build_synthetic(s)) for s in ("bf16", "f32")]

    mib = lambda kb: f"{kb / 1024:.0f}"
    print(f"{'source':<38} {'into':<9} {'reader':<17} {'wall s':>6} {'cpu s':>6} {'peak MiB':>8} "
          f"{'over base':>9} {'params':>6} {'anon end':>8}")  # fmt: skip
    device = "?"
    for name, folder in sources:
        warm(folder)
        for dtype in ("float32", "bfloat16"):
            runs: dict[str, list[dict]] = {r: [] for r in READERS}
            for _ in range(args.repeat):
                for reader in READERS:
                    runs[reader].append(measure(reader, folder, dtype, args.platform))
            for reader, rs in runs.items():
                r = max(rs, key=lambda r: r["hwm_kb"])
                device = r["device"]
                wall, cpu = statistics.median(x["seconds"] for x in rs), statistics.median(x["cpu"] for x in rs)
                print(
                    f"{name:<38} {dtype:<9} {reader:<17} {wall:6.2f} {cpu:6.2f} {mib(r['hwm_kb']):>8} "
                    f"{mib(r['hwm_kb'] - r['base_kb']):>9} {mib(r['nbytes'] / 1024):>6} {mib(r['anon_kb']):>8}",
                    flush=True,
                )
    print(f"median of {args.repeat} fresh processes per row (peak: the largest); on {device}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
