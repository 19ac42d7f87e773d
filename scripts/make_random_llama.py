#!/usr/bin/env python3
"""A Llama-shaped model directory with random weights, for memory and speed runs at scale.

    python3 scripts/make_random_llama.py OUT_DIR [--shape tinyllama-1.1b|llama-7b|small] [--seed S]

Writes OUT_DIR/config.json (LlamaForCausalLM) and OUT_DIR/model.safetensors (bf16, weights drawn
from N(0, 0.02^2), norms 1). Only numpy is needed. tinyllama-1.1b has TinyLlama-1.1B's shapes
(22 layers, hidden 2048, intermediate 5632, 32 heads, 4 key/value heads, vocab 32000): 1.10 B
parameters, 2.2 GB. The weights are noise: the runs measure memory and time, not quality.
"""
import argparse
import json
import os
import struct

import numpy as np

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # The PyTorch comparison's sizes (benchmarks/compare_pytorch_llm.py): 33.4 M and 97 M parameters.
    "bench-33m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, max_position_embeddings=1024),
    "bench-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=8000, max_position_embeddings=1024),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=2000, max_position_embeddings=512),
}


def bf16_bytes(a):
    """float32 array -> bf16 bytes (round to nearest even)."""
    u = a.astype(np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16).tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config-only", action="store_true", help="write config.json alone (memory estimates)")
    a = ap.parse_args()
    s = SHAPES[a.shape]
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", **s)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if a.config_only:
        return
    H, F, V, L = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    hd = H // s["num_attention_heads"]
    kv = hd * s["num_key_value_heads"]
    tensors = [("model.embed_tokens.weight", (V, H), "w")]
    for i in range(L):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", (H, H), "w"), (p + "self_attn.k_proj.weight", (kv, H), "w"),
                    (p + "self_attn.v_proj.weight", (kv, H), "w"), (p + "self_attn.o_proj.weight", (H, H), "w"),
                    (p + "mlp.gate_proj.weight", (F, H), "w"), (p + "mlp.up_proj.weight", (F, H), "w"),
                    (p + "mlp.down_proj.weight", (H, F), "w"), (p + "input_layernorm.weight", (H,), "1"),
                    (p + "post_attention_layernorm.weight", (H,), "1")]
    tensors += [("model.norm.weight", (H,), "1"), ("lm_head.weight", (V, H), "w")]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    rng = np.random.default_rng(a.seed)
    tmp = os.path.join(a.out, ".model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in tensors:
            if kind == "1":
                f.write(bf16_bytes(np.ones(shape, np.float32)))
            else:  # row blocks keep the float32 working set small
                rows = shape[0]
                step = max(1, (1 << 24) // shape[1])
                for r in range(0, rows, step):
                    blk = rng.standard_normal((min(step, rows - r), shape[1]), dtype=np.float32) * 0.02
                    f.write(bf16_bytes(blk))
    os.replace(tmp, os.path.join(a.out, "model.safetensors"))
    total = sum(int(np.prod(s_)) for _, s_, _ in tensors)
    print(f"{a.out}: {a.shape}, {total / 1e9:.3f} B parameters, {offset / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
