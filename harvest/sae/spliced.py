"""The spliced model: the harvest engine with a trained SAE's reconstruction substituted at its hook
(`harvest.engine.hooks.Edit`), run over held-out sequences of the store the SAE was trained on.

Reported, separately for prompt and answer tokens (the token being predicted decides):
  - next-token cross-entropy of the clean model, the spliced model, and the model with the hook
    zero-ablated; the increase (spliced - clean) and the fraction of loss recovered,
    (zero - spliced) / (zero - clean);
  - for sequences with an answer, whether greedy decoding with the splice still produces the same
    grid as the clean model (both regenerated here with the run's own generation settings), and
    the share of answers that change.
Transcoders and non-residual hooks are not spliced (the summary says why).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from harvest import arc
from harvest.engine.generate import GenerateConfig, Generator
from harvest.engine.hooks import EDITABLE_KINDS, Edit, parse_hooks
from harvest.engine.model import logits as lm_logits
from harvest.engine.prefill import forward
from harvest.engine.sampling import SamplingConfig
from harvest.engine.stopping import token_bytes_of
from harvest.sae.model import SparseCoder, reconstruct

_CE_BLOCK = 256  # positions per LM-head call: [block, vocab] float32 logits at a time


def _splice(graphdef, state, x):  # Edit.fn: the SAE's reconstruction of the hook's value
    return reconstruct((graphdef, state), x)


def _zero(_, x):
    return jnp.zeros_like(x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ce(cfg, params, x, targets):
    """x [P, D] (before the final norm), targets [P] -> [P] next-token cross-entropy (nats)."""
    logits = lm_logits(cfg, params, x)  # [P, V] float32
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]


def _cross_entropy(lm, ids: np.ndarray, edit=None, edit_params=None) -> np.ndarray:
    """[T] ids -> [T - 1] cross-entropy of predicting ids[1:], under an optional edit."""
    x, _ = forward(lm.cfg, lm.params, jnp.asarray(ids[None], jnp.int32), edit=edit, edit_params=edit_params)
    x, targets = x[0, :-1], jnp.asarray(ids[1:], jnp.int32)  # [T-1, D], [T-1]
    blocks = range(0, len(x), _CE_BLOCK)
    out = [_ce(lm.cfg, lm.params, x[a : a + _CE_BLOCK], targets[a : a + _CE_BLOCK]) for a in blocks]
    return np.concatenate([np.asarray(o) for o in out])


def _mean(xs: list[np.ndarray]) -> float | None:
    x = np.concatenate(xs) if xs else np.zeros(0)
    return float(x.mean()) if x.size else None


def _recovered(clean, spliced, zero) -> float | None:
    if None in (clean, spliced, zero) or zero == clean:
        return None
    return (zero - spliced) / (zero - clean)


def spliced_eval(sae: SparseCoder, store, sequence_ids, lm=None) -> dict:
    """The spliced-model figures over `sequence_ids` of `store`; lm: the run's model (loaded from
    run.json if None)."""
    if sae.spec.hook_in != sae.spec.hook_out:
        return {"skipped": "a transcoder predicts another hook; only SAEs are spliced"}
    meta = store.metadata
    source = (meta.get("model") or {}).get("source")
    if lm is None and not (source and "config" in meta):
        return {"skipped": f"{store.root}/run.json names no model: the store was not written by `harvest run`"}
    if lm is None:
        from harvest.weights.checkpoint import load_model

        lm = load_model(source, meta["config"]["model"]["dtype"])
    (hook,) = parse_hooks(sae.spec.hook_in, lm.cfg)
    if hook.kind not in EDITABLE_KINDS:
        return {"skipped": f"{hook.name} is not on the residual path; editable kinds: {', '.join(EDITABLE_KINDS)}"}
    graphdef, state = nnx.split(sae)
    spliced = Edit(hook, functools.partial(_splice, graphdef))
    zero = Edit(hook, _zero)
    ce = {name: {"prompt": [], "answer": []} for name in ("clean", "spliced", "zero")}
    with_answers = []
    for sid in sequence_ids:
        seq = store.sequence(int(sid))
        ids, answer = np.asarray(seq["token_id"]), np.asarray(seq["phase"])[1:] == 1  # [T], [T-1]
        for name, edit, p in (("clean", None, None), ("spliced", spliced, state), ("zero", zero, None)):
            x = _cross_entropy(lm, ids, edit, p)
            ce[name]["prompt"].append(x[~answer])
            ce[name]["answer"].append(x[answer])
        if answer.any():
            with_answers.append((int(sid), ids[: int((~answer).sum()) + 1]))  # the prompt
    out = {"sequences": len(sequence_ids), "hook": hook.name}
    for part in ("prompt", "answer"):
        c, s, z = (_mean(ce[n][part]) for n in ("clean", "spliced", "zero"))
        increase = None if None in (c, s) else s - c
        out[part] = {"ce_clean": c, "ce_spliced": s, "ce_zero_ablation": z, "ce_increase": increase,
                     "loss_recovered": _recovered(c, s, z)}  # fmt: skip
    out["answers"] = _answers_changed(lm, meta, with_answers, spliced, state) if with_answers else None
    return out


def _answers_changed(lm, meta: dict, prompts: list, edit: Edit, state) -> dict:
    """Greedy-regenerate each prompt clean and spliced with the run's generation settings; compare grids."""
    run = meta["config"]
    g, fmt = run["generation"], run["prompt"]["format"]
    stops = tuple(g["stop_strings"]) if isinstance(g["stop_strings"], list) else ()
    base = dict(
        batch_size=4, decode_slots=4, prefill_chunk=128, max_prompt_len=max(len(p) for _, p in prompts),
        max_new_tokens=g["max_new_tokens"], sampling=SamplingConfig(), stop_strings=stops, seed=g["seed"],
    )  # fmt: skip
    kw = dict(eos_ids=lm.eos_ids, token_bytes=token_bytes_of(lm.tokenizer) if stops else None)
    ids, items = [s for s, _ in prompts], [p for _, p in prompts]
    clean = Generator(lm.cfg, lm.params, GenerateConfig(**base), **kw).generate(items, ids)
    spliced = Generator(lm.cfg, lm.params, GenerateConfig(**base, edit=edit), edit_params=state, **kw)
    changed = 0
    for a, b in zip(clean, spliced.generate(items, ids)):
        grid_a, grid_b = (
            arc.parse_grid(lm.tokenizer.decode(t, skip_special_tokens=True), fmt)[0] for t in (a.tokens, b.tokens)
        )
        changed += not _same_grid(grid_a, grid_b)
    return {"answers": len(prompts), "changed": changed, "share_changed": changed / len(prompts)}


def _same_grid(a, b) -> bool:
    """Two parsed answers (a grid or None when the text does not parse) are the same answer."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a == b).all())
