"""A Qwen2 checkpoint whose greedy continuation is scripted: a bigram table on real Qwen2 token ids.

Every layer's attention and MLP output is zero (o_proj and down_proj are 0), so the last residual
is the current token's embedding. Embeddings are one-hot (token k of the script -> e_k), and the
LM head row of each successor is that one-hot, so after token script[k] the model's argmax is
script[k + 1]; every other logit is 0. With the real tokenizer, this lets a run test the real stop
rules (blank line, "Input", <|im_end|>) end to end, with no torch needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

VOCAB = 151936
D, HEADS, KV_HEADS, D_MLP, LAYERS = 32, 2, 1, 32, 1


def scripted_checkpoint(folder: Path, chain: list[int], eos: int = 151643) -> Path:
    """chain: token ids; after chain[k] greedy picks chain[k + 1]. Ids must be distinct (but the last
    may repeat an earlier one, which makes the script loop)."""
    assert len(set(chain[:-1])) == len(chain) - 1 <= D
    dh = D // HEADS
    embed = np.zeros((VOCAB, D), np.float32)
    head = np.zeros((VOCAB, D), np.float32)
    for k, (tok, nxt) in enumerate(zip(chain, chain[1:])):
        embed[tok, k] = 1.0
        head[nxt, k] = 1.0
    tensors = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": np.ones(D, np.float32)}
    shapes = {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (HEADS * dh, D), "self_attn.q_proj.bias": (HEADS * dh,),
        "self_attn.k_proj.weight": (KV_HEADS * dh, D), "self_attn.k_proj.bias": (KV_HEADS * dh,),
        "self_attn.v_proj.weight": (KV_HEADS * dh, D), "self_attn.v_proj.bias": (KV_HEADS * dh,),
        "self_attn.o_proj.weight": (D, HEADS * dh),
        "mlp.gate_proj.weight": (D_MLP, D), "mlp.up_proj.weight": (D_MLP, D), "mlp.down_proj.weight": (D, D_MLP),
    }  # fmt: skip
    for name, shape in shapes.items():
        value = np.ones(shape, np.float32) if "layernorm" in name else np.zeros(shape, np.float32)
        tensors[f"model.layers.0.{name}"] = value
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": D,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": D_MLP, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": eos,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder
