"""Per-row stop rules that run inside the jitted decode loop.

EOS ids stop a row directly. A stop string (e.g. the blank line after an ARC grid) may span
several tokens and may sit inside a merged token, so it is matched on bytes with a small
automaton: state = how many bytes of the string the generated text currently ends with. A table
[states, V] gives the next state for every token, and reaching len(string) means stop. Tables are
built once on the host from the tokenizer's byte strings.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from harvest.store.format import STOP_REASONS

QWEN2_EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>

# Stop codes as the decode loop records them; the stored names are the format's vocabulary.
STOP_NONE, STOP_EOS, STOP_STRING, STOP_LENGTH = (
    STOP_REASONS.index(n) for n in ("none", "eos", "stop_string", "max_new_tokens")
)


@dataclasses.dataclass(frozen=True)
class StopRules:
    """Host-side description; `tables()` gives the device arrays the decode loop uses."""

    eos_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    token_bytes: tuple[bytes, ...] | None = None  # per vocab id; needed only for stop strings

    def tables(self, vocab_size: int):
        """-> (is_eos [V] bool, transitions [n_strings, max_len+1, V] int16, lengths [n])."""
        is_eos = np.zeros(vocab_size, bool)
        for i in self.eos_ids:
            if 0 <= i < vocab_size:
                is_eos[i] = True
        if not self.stop_strings:
            return jnp.asarray(is_eos), None, None
        if self.token_bytes is None:
            raise ValueError("stop strings need the tokenizer's token bytes")
        if not all(self.stop_strings):
            raise ValueError("stop strings must be non-empty (an empty one would stop every row at once)")
        pats = [s.encode() for s in self.stop_strings]
        width = max(len(p) for p in pats) + 1
        trans = np.zeros((len(pats), width, vocab_size), np.int16)
        for n, pat in enumerate(pats):
            trans[n, : len(pat) + 1] = _transition_table(pat, self.token_bytes, vocab_size)
        return jnp.asarray(is_eos), jnp.asarray(trans), jnp.asarray([len(p) for p in pats], jnp.int16)


@functools.lru_cache(maxsize=16)
def _transition_table(pat: bytes, token_bytes: tuple[bytes, ...], vocab_size: int) -> np.ndarray:
    """[len(pat)+1, V]: the state after appending token t in state s (len(pat) = matched)."""
    m = len(pat)
    table = np.zeros((m + 1, vocab_size), np.int16)
    table[m] = m  # absorbing: once stopped, stays stopped
    # Only a token that holds the pattern, ends with a prefix of it, starts with a suffix of it (a match
    # across the boundary) or lies inside it can move the state off 0; for every other token each state
    # resets. Four tests in C per token, not the loop below for each of 150k (default stops: 0.9 -> 0.3 s).
    prefixes, suffixes = tuple(pat[:k] for k in range(1, m)), tuple(pat[k:] for k in range(1, m))
    for t, tb in enumerate(token_bytes[:vocab_size]):
        if not tb or not (pat in tb or tb in pat or tb.endswith(prefixes) or tb.startswith(suffixes)):
            continue
        for s in range(m):
            text = pat[:s] + tb
            if pat in text:
                table[s, t] = m
                continue
            for k in range(min(m - 1, len(text)), 0, -1):
                if text.endswith(pat[:k]):
                    table[s, t] = k
                    break
    return table


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE spells byte b as one printable character: itself when printable, else
    chr(256 + n) for the n-th unprintable byte. Returns that character -> byte map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


def token_bytes_of(tokenizer) -> tuple[bytes, ...]:
    """The raw bytes of every vocab id of a byte-level BPE tokenizer (Qwen2's)."""
    decoder = _byte_level_alphabet()
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    out = [b""] * size
    for piece, idx in vocab.items():
        try:
            out[idx] = bytes(decoder[ch] for ch in piece)
        except KeyError:  # added/special tokens are stored as plain text
            out[idx] = piece.encode()
    return tuple(out)


def eos_ids_for(hf_config: dict, generation_config: dict | None, vocab_size: int) -> tuple[int, ...]:
    """EOS ids from generation_config.json and config.json, plus both Qwen2 end tokens."""
    ids: list[int] = []
    for src in (generation_config or {}, hf_config):
        e = src.get("eos_token_id")
        ids += list(e) if isinstance(e, (list, tuple)) else ([e] if e is not None else [])
    ids += list(QWEN2_EOS_IDS)
    return tuple(sorted({int(i) for i in ids if 0 <= int(i) < vocab_size}))
