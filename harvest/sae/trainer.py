"""`train(cfg) -> summary`: a sparse coder trained on a harvest store, resumable, data parallel.

OUT (output.path):
    config.json      the resolved config of the first session; a resume must match it (RESUMABLE_KEYS aside)
    checkpoints/     orbax, every train.checkpoint_every steps and at the end (harvest.sae.checkpoint)
    metrics.jsonl    a line every train.log_every steps, one per evaluation (harvest.sae.metrics)
    sae/             the final SAE, harvest's format (harvest.sae.export.load_sae)
    saelens/         the final SAE in SAELens' format (topk, batchtopk), if output.saelens
    summary.json     the final summary (also returned)

Re-running the same config on the same OUT resumes from the latest checkpoint; a killed run loses
only the steps after it. `harvest.failpoints.hit("train.step")` runs before every step (the fault tests).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from harvest import failpoints
from harvest.data import open_store
from harvest.sae import export
from harvest.sae.checkpoint import Checkpoints
from harvest.sae.config import ConfigError, TrainConfig, changed_keys
from harvest.sae.data import Position, TrainData
from harvest.sae.metrics import MetricsLog, figures
from harvest.sae.model import SAESpec, SparseCoder
from harvest.sae.objective import StepConfig, make_eval_step, make_train_step
from harvest.sae.sharding import batch_sharding, build_mesh, replicated, state_shardings
from harvest.sae.spliced import spliced_eval
from harvest.sae.state import Accum, init_sae, init_state, lr_at, make_optimizer
from harvest.store.reader import NotARunError

__all__ = ["train", "Trainer"]

log = logging.getLogger("harvest.sae")


def _check_output(cfg: TrainConfig, overwrite: bool) -> Path:
    """OUT, unless it holds a training with other settings (nothing is created or deleted here)."""
    out = Path(cfg.output.path)
    saved = out / "config.json"
    if not overwrite and saved.is_file():
        diff = changed_keys(json.loads(saved.read_text()), cfg)
        if diff:
            raise ConfigError(
                f"output.path {out} holds a training with other settings ({'; '.join(diff)}); "
                "pass --overwrite to start over, or choose another output.path"
            )
    return out


def _scales(store, cfg: TrainConfig, hooks: tuple[str, str]) -> tuple[float, float]:
    """sqrt(d) / E|x| of the input and output hooks, from the store's cached statistics (the group of
    data.phase, all rows if none; attention sinks left out), or 1 with sae.normalize: none."""
    if cfg.sae.normalize == "none":
        return 1.0, 1.0
    group = cfg.data.phase or "all"
    return tuple(float(store.stats(h).group(group).scale_factor) for h in hooks)


def _references(store, hook: str, scale: float, d: int) -> np.ndarray:
    """[2, d] each phase's mean (normalised), from the statistics: the metric sums' reference."""
    st = store.stats(hook)
    ref = np.stack([st.group(p).mean for p in ("prefill", "decode")]) * scale  # [2, d]
    return np.where(np.isfinite(ref), ref, 0.0)


class Trainer:
    """One training session: built from a config, run() to the last step."""

    def __init__(self, cfg: TrainConfig, overwrite: bool = False):
        self.cfg, t = cfg, cfg.train
        if cfg.runtime.compile_cache:  # a resumed or repeated training loads its programs instead of compiling
            jax.config.update("jax_compilation_cache_dir", cfg.runtime.compile_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.out = _check_output(cfg, overwrite)
        try:
            self.store = open_store(cfg.data.store)
        except NotARunError as e:
            raise ConfigError(f"data.store: {e}") from None
        self.data = TrainData(self.store, cfg)
        d_in, d_out = self.data.widths
        d_sae = cfg.d_sae(d_in)
        if cfg.sae.k > d_sae:
            raise ConfigError(f"sae.k: {cfg.sae.k} is more than the {d_sae} latents; lower it or raise sae.d_sae")
        self.spec = SAESpec(cfg.sae.architecture, d_in, d_out, d_sae, cfg.sae.k, self.data.hook_in, self.data.hook_out)
        self.mesh = build_mesh(cfg.runtime.mesh, t.batch_size, d_sae)
        self.tx = make_optimizer(cfg)
        self.scales = _scales(self.store, cfg, (self.data.hook_in, self.data.hook_out))
        # every refusal is above: only a config that can train touches the output folder
        if overwrite and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = Checkpoints(self.out / "checkpoints", t.keep_checkpoints)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        k_aux = min(cfg.sae.k_aux or d_out // 2, d_sae)
        self.step_config = StepConfig(
            k_aux, t.aux_coefficient, t.dead_tokens, t.threshold_lr, cfg.sae.architecture == "batchtopk"
        )

    # ------------------------------------------------------------ state

    def _fresh_state(self):
        sample = self.data.sample(self.cfg.sae.init_tokens)
        sae = init_sae(self.spec, self.cfg, self.scales, sample)
        ref = _references(self.store, self.data.hook_out, self.scales[1], self.spec.d_out)
        return sae, init_state(sae, self.tx, ref)

    def _start(self):
        """-> (graphdef, state on the mesh, Position): the latest checkpoint's, or a fresh start."""
        latest = self.ckpt.latest()
        if latest is None:
            sae, state = self._fresh_state()
            graphdef = nnx.graphdef(sae)
        else:
            graphdef, state = self._abstract()
        self.shardings = state_shardings(self.mesh, state)
        if latest is None:
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            return graphdef, jax.device_put(state, self.shardings), Position()
        state, position, meta = self.ckpt.restore(latest, state, self.shardings)
        self.metrics.truncate_after(latest)
        self.resumed_from = latest
        log.info("resuming %s from step %d (epoch %d, batch %d)", self.out, latest, position.epoch, position.batch)
        return graphdef, state, position

    def _abstract(self):
        """The state's structure without reading data or drawing weights (a checkpoint fills it)."""
        d = self.spec
        sample = (np.zeros((1, d.d_in), np.float32), np.zeros((1, d.d_out), np.float32))
        box = {}

        def build():
            sae = init_sae(self.spec, self.cfg, (1.0, 1.0), sample)
            box["graphdef"] = nnx.graphdef(sae)
            return init_state(sae, self.tx, np.zeros((2, d.d_out)))

        state = jax.eval_shape(build)
        return box["graphdef"], state

    # ------------------------------------------------------------ compiled steps

    def _compile(self, graphdef):
        data, rep = batch_sharding(self.mesh), replicated(self.mesh)
        step = make_train_step(graphdef, self.tx, self.step_config)
        self.train_step = jax.jit(
            step,
            in_shardings=(self.shardings, data, data, data, rep),
            out_shardings=(self.shardings, rep),
            donate_argnums=0,
        )
        acc_sh = self.shardings.acc
        self.reset_acc = jax.jit(
            lambda s: dataclasses.replace(s, acc=Accum.zeros(self.spec.d_out)),
            in_shardings=(self.shardings,),
            out_shardings=self.shardings,
            donate_argnums=0,
        )
        ev = make_eval_step(graphdef)
        self.eval_step = jax.jit(
            ev,
            in_shardings=(acc_sh, rep, self.shardings.params, self.shardings.variables, data, data, data),
            out_shardings=acc_sh,
        )

    def evaluate(self, state) -> dict:
        """Figures on the held-out rows (inference codes), in batches of train.batch_size."""
        if not hasattr(self, "_eval"):
            self._eval = self.data.eval_set(self.cfg.data.eval_tokens)
        x, y, phase = self._eval
        B = self.cfg.train.batch_size
        acc = jax.device_put(Accum.zeros(self.spec.d_out), self.shardings.acc)
        for i in range(0, len(x), B):
            xb, yb, pb = x[i : i + B], y[i : i + B], phase[i : i + B].astype(np.int32)
            pad = B - len(xb)
            if pad:  # a fixed shape (one compilation); padding rows have phase -1, which no sum counts
                xb = np.concatenate([xb, np.zeros((pad, xb.shape[1]), np.float32)])
                yb = np.concatenate([yb, np.zeros((pad, yb.shape[1]), np.float32)])
                pb = np.concatenate([pb, np.full(pad, -1, np.int32)])
            acc = self.eval_step(acc, state.ref, state.params, state.variables, xb, yb, pb)
        return figures(jax.device_get(acc), np.asarray(state.ref))

    # ------------------------------------------------------------ the loop

    def _window(self, state, step: int, seconds: float, tokens: int) -> dict:
        """The metrics line of the logging window that ends at `step`."""
        acc = jax.device_get(state.acc)
        n = max(float(acc.steps), 1.0)
        fig = figures(acc, np.asarray(state.ref))
        dead = int(np.sum(np.asarray(state.since_fired) >= self.cfg.train.dead_tokens))
        rec = {
            "step": step,
            "tokens": step * self.cfg.train.batch_size,  # trained so far
            "window_tokens": fig.pop("tokens"),  # the rows the window's figures are over
            "lr": lr_at(self.cfg, self.spec.d_sae, step - 1),  # of the window's last step
            "loss": float(acc.loss) / n,
            "mse": float(acc.mse) / n,
            "aux": float(acc.aux) / n,
            **fig,
            "dead": dead,
            "dead_fraction": dead / self.spec.d_sae,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
        }
        if self.spec.architecture == "batchtopk":
            rec["threshold"] = float(state.variables["threshold"][...])
        return rec

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.resumed_from = None
        graphdef, state, position = self._start()
        self._compile(graphdef)
        total, B = cfg.total_steps, t.batch_size
        step = int(state.step)
        start_step, t0 = step, time.perf_counter()
        window_t, window_tokens, last = time.perf_counter(), 0, None
        last_eval = None
        bar = self._progress(step, total)
        stream = self.data.batches(position)
        while step < total:
            failpoints.hit("train.step")
            batch = next(stream)
            lr = np.float32(lr_at(cfg, self.spec.d_sae, step))
            state, _ = self.train_step(state, batch.x, batch.y, batch.phase.astype(np.int32), lr)
            step, position = step + 1, batch.after
            window_tokens += B
            if bar is not None:
                bar.update(1)
            if step % t.log_every == 0 or step == total:
                now = time.perf_counter()
                last = {"epoch": position.epoch, **self._window(state, step, now - window_t, window_tokens)}
                self.metrics.write(last)
                state = self.reset_acc(state)
                window_t, window_tokens = now, 0
            if (t.eval_every and step % t.eval_every == 0) or step == total:
                last_eval = {"step": step, "eval": self.evaluate(state)}
                self.metrics.write(last_eval)
            if step % t.checkpoint_every == 0 or step == total:
                self.ckpt.save(step, state, position, {"tokens": step * B})
        stream.close()  # stops the loader's read-ahead thread now
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        if last is None:  # resumed at the end: nothing trained in this session
            rows = self.metrics.read()
            last = next((r for r in reversed(rows) if "loss" in r), {})
            last_eval = next((r for r in reversed(rows) if "eval" in r), {"eval": self.evaluate(state)})
        return self._finish(graphdef, state, last, last_eval["eval"], step - start_step, seconds)

    def _progress(self, step: int, total: int):
        if not self.cfg.runtime.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=step, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True)

    def _finish(self, graphdef, state, last: dict, ev: dict, steps: int, seconds: float) -> dict:
        cfg = self.cfg
        sae: SparseCoder = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.variables))
        info = {
            "hooks": {"in": self.spec.hook_in, "out": self.spec.hook_out},
            "store": str(Path(cfg.data.store).absolute()),
            "model": (self.store.metadata.get("model") or {}).get("source"),
            "steps": int(state.step),
            "config": cfg.to_dict(),
        }
        paths = {"sae": str(export.save_sae(sae, self.out / "sae", info))}
        if cfg.output.saelens and self.spec.architecture in export.SAELENS_ARCHITECTURES:
            meta = {"model_name": info["model"], "harvest_store": info["store"], "harvest_hook": self.spec.hook_in}
            paths["saelens"] = str(export.export_saelens(sae, self.out / "saelens", meta))
        paths |= {"checkpoints": str(self.ckpt.directory), "metrics": str(self.metrics.path)}
        self.ckpt.close()
        spliced = None
        if cfg.train.spliced_sequences:  # the engine with the SAE substituted at its hook (harvest.sae.spliced)
            ids = sorted(int(i) for i in self.data.heldout_ids)[: cfg.train.spliced_sequences]
            spliced = spliced_eval(sae, self.store, ids) if ids else {"skipped": "no held-out sequences"}
            self.metrics.write({"step": int(state.step), "spliced": spliced})
        tokens = steps * cfg.train.batch_size
        summary = {
            "architecture": self.spec.architecture,
            "hooks": info["hooks"],
            "d_in": self.spec.d_in,
            "d_out": self.spec.d_out,
            "d_sae": self.spec.d_sae,
            "k": self.spec.k,
            "steps": int(state.step),
            "tokens": int(state.step) * cfg.train.batch_size,
            "session": {
                "steps": steps,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds if seconds > 0 else None,
                "resumed_from": self.resumed_from,
                "devices": int(self.mesh.devices.size),
                "mesh": dict(self.mesh.shape),
            },
            "train": last,
            "eval": ev,
            "spliced": spliced,
            "heldout_sequences": len(self.data.heldout_ids),
            "eval_rows": len(self.data.eval_rows),
            "scales": {"in": self.scales[0], "out": self.scales[1]},
            "paths": paths,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg: TrainConfig, overwrite: bool = False) -> dict:
    """Train (or resume) as the config says; -> the summary (also OUT/summary.json)."""
    return Trainer(cfg, overwrite).run()
