"""Hook points, named and defined as in TransformerLens so SAELens users feel at home.

Every hook stores one row per token, [T, width]. Per-head tensors, which TransformerLens keeps as
[T, heads, d_head], are flattened head-major to width heads*d_head (column h*Dh + d is head h,
dimension d; `.reshape(T, heads, Dh)` restores them). D d_model, F d_mlp, H query heads, K kv heads,
Dh head_dim.

Outside the blocks (`Hook.layer` is -1 for hook_embed, before block 0, and n_layers for ln_final, after
the last block, so hooks sort in forward order; neither has `blocks.L.` in its name):
    hook_embed                embed_tokens(ids): the token embeddings entering block 0          D
                              (Qwen2 has no positional embedding, so = blocks.0.hook_resid_pre)
    ln_final.hook_normalized  x / sqrt(mean(x^2) + eps), x = the last block's hook_resid_post:  D
                              (mean over d_model, in float32, stored in the model's dtype)
                              the final RMSNorm BEFORE its weight, as TransformerLens' RMSNorm
                              hooks x / scale before multiplying by w (with fold_ln the weight is
                              folded into the unembed, so this is what its LM head reads);
                              transformers' last hidden_states entry = this * model.norm.weight.
                              Needs every layer: a prefill-only run then runs the whole model.

For layer L (0-based), with x the residual stream entering the block and h = input_layernorm(x):
    hook_resid_pre       x                                      = transformers hidden_states[L]    D
    attn.hook_q          q_proj(h) (with its bias), BEFORE RoPE: [T, H, Dh] flattened              H*Dh
    attn.hook_k          k_proj(h) (with its bias), BEFORE RoPE: [T, K, Dh] flattened              K*Dh
                         (the K kv heads, not repeated to H, as TransformerLens' grouped-query
                         attention without ungroup_grouped_query_attention)
    attn.hook_v          v_proj(h) (with its bias): [T, K, Dh] flattened                            K*Dh
    attn.hook_z          softmax(causal(rope(q) . rope(k) / sqrt(Dh))) @ v per query head (each     H*Dh
                         reading its group's kv head): the attention output BEFORE o_proj,
                         [T, H, Dh] flattened (exactly o_proj's input)
    hook_attn_out        o_proj(attn.hook_z)                    = output of self_attn              D
    hook_resid_mid       x + attn_out                                                              D
    mlp.hook_pre         gate_proj(h2), h2 = post_attention_layernorm(resid_mid): BEFORE SiLU      F
    mlp.hook_pre_linear  up_proj(h2)                                                               F
    mlp.hook_post        silu(mlp.hook_pre) * mlp.hook_pre_linear: the input of down_proj          F
                         (what transcoders read)
    hook_mlp_out         down_proj(mlp.hook_post)               = output of mlp                    D
    hook_resid_post      resid_mid + mlp_out                    = hidden_states[L+1] for L < last  D
                         (transformers' last hidden_states entry is after the final norm; ours is not)

Not offered: TransformerLens' post-rotary attn.hook_rot_q / attn.hook_rot_k, hook_attn_scores,
hook_pattern, and the norms' hook_scale.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable

from harvest.engine.config import ModelConfig
from harvest.errors import HarvestError


@dataclasses.dataclass(frozen=True)
class HookKind:
    name: str  # the TransformerLens name; block kinds get a `blocks.L.` prefix
    width: Callable[[ModelConfig], int]
    site: str = "block"  # "block" (one per layer), "embed" (before block 0) or "final" (after the last block)


# Every hook kind, in forward order: the one place that says what a kind is called and how wide it is.
HOOK_KINDS: dict[str, HookKind] = {
    "embed": HookKind("hook_embed", lambda c: c.d_model, "embed"),
    "resid_pre": HookKind("hook_resid_pre", lambda c: c.d_model),
    "q": HookKind("attn.hook_q", lambda c: c.n_heads * c.head_dim),
    "k": HookKind("attn.hook_k", lambda c: c.n_kv_heads * c.head_dim),
    "v": HookKind("attn.hook_v", lambda c: c.n_kv_heads * c.head_dim),
    "z": HookKind("attn.hook_z", lambda c: c.n_heads * c.head_dim),
    "attn_out": HookKind("hook_attn_out", lambda c: c.d_model),
    "resid_mid": HookKind("hook_resid_mid", lambda c: c.d_model),
    "mlp_pre": HookKind("mlp.hook_pre", lambda c: c.d_mlp),
    "mlp_pre_linear": HookKind("mlp.hook_pre_linear", lambda c: c.d_mlp),
    "mlp_post": HookKind("mlp.hook_post", lambda c: c.d_mlp),
    "mlp_out": HookKind("hook_mlp_out", lambda c: c.d_model),
    "resid_post": HookKind("hook_resid_post", lambda c: c.d_model),
    "ln_final": HookKind("ln_final.hook_normalized", lambda c: c.d_model, "final"),
}
KINDS = tuple(k for k, v in HOOK_KINDS.items() if v.site == "block")  # the per-layer kinds


class HookError(HarvestError, ValueError):
    """An unknown or impossible hook name. The message is one line and lists the valid choices."""


@dataclasses.dataclass(frozen=True, order=True)
class Hook:
    """A block hook is (layer, kind); hook_embed is Hook(-1, "embed") and ln_final.hook_normalized is
    Hook(n_layers, "ln_final") (see `embed_hook`, `final_hook`), so sorting follows the forward pass."""

    layer: int
    kind: str

    def __post_init__(self):
        site = HOOK_KINDS[self.kind].site if self.kind in HOOK_KINDS else None
        if site is None:
            raise HookError(f"unknown hook kind {self.kind!r}; valid kinds are {', '.join(HOOK_KINDS)}")
        if (site == "embed" and self.layer != -1) or (site != "embed" and self.layer < 0):
            raise HookError(f"hook kind {self.kind!r} cannot have layer {self.layer}")

    @property
    def is_block(self) -> bool:
        return HOOK_KINDS[self.kind].site == "block"

    @property
    def name(self) -> str:
        name = HOOK_KINDS[self.kind].name
        return f"blocks.{self.layer}.{name}" if self.is_block else name

    @property
    def depth(self) -> int:
        """How many layers must run before this hook exists: 0 for hook_embed, all for ln_final."""
        return self.layer if HOOK_KINDS[self.kind].site == "final" else self.layer + 1

    def width(self, cfg: ModelConfig) -> int:
        return HOOK_KINDS[self.kind].width(cfg)

    def __str__(self) -> str:
        return self.name


def embed_hook() -> Hook:
    return Hook(-1, "embed")


def final_hook(cfg: ModelConfig) -> Hook:
    return Hook(cfg.n_layers, "ln_final")


def all_hooks(cfg: ModelConfig) -> list[Hook]:
    blocks = [Hook(layer, kind) for layer in range(cfg.n_layers) for kind in KINDS]
    return [embed_hook(), *blocks, final_hook(cfg)]


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

    Negative layers count from the end (`blocks.-1.hook_resid_post`). `hook_embed` and
    `ln_final.hook_normalized` are matched by their own names (or a pattern like `*`), never by a
    `blocks.` pattern. The result is sorted (forward order) and de-duplicated, so the order of the
    patterns never changes the data.
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
    block_names = [HOOK_KINDS[k].name for k in KINDS]
    if m and m[2] in block_names and int(m[1]) >= cfg.n_layers:
        return f"hook {pat!r}: layer {m[1]} does not exist; valid layers are 0-{cfg.n_layers - 1}"
    return (
        f"unknown hook {pat!r}; valid hooks are {HOOK_KINDS['embed'].name}, "
        f"blocks.{{0-{cfg.n_layers - 1}}}.{{{', '.join(block_names)}}}, {HOOK_KINDS['ln_final'].name} "
        "(globs and ranges allowed)"
    )


def kinds_by_layer(hooks: tuple[Hook, ...]) -> dict[int, frozenset[str]]:
    """{layer: the kinds hooked in that block}; hooks outside the blocks are left out."""
    by: dict[int, set[str]] = {}
    for h in hooks:
        if h.is_block:
            by.setdefault(h.layer, set()).add(h.kind)
    return {k: frozenset(v) for k, v in by.items()}


def layers_needed(hooks: tuple[Hook, ...]) -> int:
    """How many layers a forward pass must run to compute every hook (the deepest block hook's layer + 1;
    0 for hook_embed alone; every layer with ln_final.hook_normalized): a prefill-only run stops there."""
    return max((h.depth for h in hooks), default=0)


EDITABLE_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace one block hook's value in the forward pass by `fn(params, x)`, e.g. an SAE's reconstruction
    (the spliced model). x [..., width] in the model's dtype; fn must be pure and traceable by jit, and
    `params` (any pytree) is passed to the engine beside it, so one compiled program serves new weights.
    Only values that flow on are editable: the residual stream and the two outputs added to it. A hook
    captured at the edited point records the edited value (what the rest of the model sees)."""

    hook: Hook
    fn: Callable

    def __post_init__(self):
        if self.hook.kind not in EDITABLE_KINDS:
            raise HookError(
                f"{self.hook.name} cannot be edited; editable hooks are blocks.L.{{"
                + ",".join(HOOK_KINDS[k].name for k in EDITABLE_KINDS)
                + "}"
            )
