"""Hook points, named as in TransformerLens so SAELens users feel at home.

For layer L (0-based), with x the residual stream entering the block:
    hook_resid_pre   x                                       = transformers hidden_states[L]
    hook_attn_out    o_proj(attention(input_layernorm(x)))   = output of self_attn
    hook_resid_mid   x + attn_out
    mlp.hook_post    silu(gate_proj(h)) * up_proj(h), h = post_attention_layernorm(resid_mid)
                     (width d_mlp: the input of down_proj, what transcoders read)
    hook_mlp_out     down_proj(mlp.hook_post)                = output of mlp
    hook_resid_post  resid_mid + mlp_out                     = hidden_states[L+1] for L < last
                     (transformers' last hidden_states entry is after the final norm; ours is not)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re

from harvest.engine.config import ModelConfig
from harvest.errors import HarvestError

KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post")
_NAME_OF_KIND = {k: f"hook_{k}" for k in KINDS} | {"mlp_post": "mlp.hook_post"}
_KIND_OF_NAME = {v: k for k, v in _NAME_OF_KIND.items()}


class HookError(HarvestError, ValueError):
    """An unknown or impossible hook name. The message is one line and lists the valid choices."""


@dataclasses.dataclass(frozen=True, order=True)
class Hook:
    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{_NAME_OF_KIND[self.kind]}"

    def width(self, cfg: ModelConfig) -> int:
        return cfg.d_mlp if self.kind == "mlp_post" else cfg.d_model

    def __str__(self) -> str:
        return self.name


def all_hooks(cfg: ModelConfig) -> list[Hook]:
    return [Hook(layer, kind) for layer in range(cfg.n_layers) for kind in KINDS]


def _expand_ranges(pattern: str, n_layers: int) -> list[str]:
    """`blocks.2-5.hook_x` and `blocks.{2..5}.hook_x` become one name per layer."""
    m = re.fullmatch(r"blocks\.\{?(-?\d+)(?:-|\.\.)(-?\d+)\}?\.(.+)", pattern)
    if not m:
        return [pattern]
    lo, hi, rest = int(m[1]), int(m[2]), m[3]
    if not (0 <= lo <= hi < n_layers):
        raise HookError(f"hook layer range {lo}-{hi} in {pattern!r} is outside 0-{n_layers - 1}")
    return [f"blocks.{i}.{rest}" for i in range(lo, hi + 1)]


def parse_hooks(patterns: list[str] | str, cfg: ModelConfig) -> tuple[Hook, ...]:
    """Resolve names, globs (`blocks.*.hook_resid_post`) and ranges (`blocks.0-3.hook_mlp_out`).

    Negative layers count from the end (`blocks.-1.hook_resid_post`). The result is sorted and
    de-duplicated, so the order of the patterns never changes the data.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise HookError("no hooks given; e.g. blocks.0.hook_resid_post")
    valid = {h.name: h for h in all_hooks(cfg)}
    out: set[Hook] = set()
    for raw in patterns:
        for pat in _expand_ranges(str(raw).strip(), cfg.n_layers):
            m = re.fullmatch(r"blocks\.(-\d+)\.(.+)", pat)
            if m:
                layer = int(m[1]) + cfg.n_layers
                if layer < 0:
                    raise HookError(f"hook {pat!r}: layer {m[1]} is out of range for {cfg.n_layers} layers")
                pat = f"blocks.{layer}.{m[2]}"
            matched = [h for name, h in valid.items() if fnmatch.fnmatchcase(name, pat)]
            if not matched:
                raise HookError(_unknown_message(pat, cfg))
            out.update(matched)
    return tuple(sorted(out))


def _unknown_message(pat: str, cfg: ModelConfig) -> str:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", pat)
    kinds = ", ".join(_NAME_OF_KIND.values())
    if m and m[2] in _KIND_OF_NAME and int(m[1]) >= cfg.n_layers:
        return f"hook {pat!r}: layer {m[1]} does not exist; valid layers are 0-{cfg.n_layers - 1}"
    return (
        f"unknown hook {pat!r}; valid hooks are blocks.{{0-{cfg.n_layers - 1}}}.{{{kinds}}} (globs and ranges allowed)"
    )


def kinds_by_layer(hooks: tuple[Hook, ...]) -> dict[int, frozenset[str]]:
    by: dict[int, set[str]] = {}
    for h in hooks:
        by.setdefault(h.layer, set()).add(h.kind)
    return {k: frozenset(v) for k, v in by.items()}


def layers_needed(hooks: tuple[Hook, ...]) -> int:
    """How many layers a forward pass must run to compute every hook (the deepest hook's layer + 1):
    a prefill-only run stops there."""
    return max((h.layer for h in hooks), default=-1) + 1
