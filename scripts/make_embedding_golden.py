#!/usr/bin/env python3
"""PEFT references for LoRA on embeddings and trainable tokens (tests/io/test_merge_embeddings.cpp).

    python3 scripts/make_embedding_golden.py [OUT_DIR]   # default tests/data/models/embeddings

Builds two tiny Llamas with transformers (random weights, seed 2025; hidden 16, vocab 64, 2 layers;
no pad_token_id: transformers would give the embedding a padding_idx, whose row gets no gradient):
base_untied (lm_head.weight stored) and base_tied (tie_word_embeddings: no lm_head.weight). For
each case it applies a PEFT LoraConfig, perturbs every adapter tensor (so no delta is zero), saves
the adapter (save_pretrained) and writes:
  <case>/adapter/                      adapter_config.json + adapter_model.safetensors
  <case>/merged.safetensors            the tensors of merge_and_unload()'s save_pretrained that differ
                                       from the base's (the others are equal; the set of names too)
  <case>/logits.safetensors            "input_ids" (i64, 1 x 12) and "logits" (f32) of the unmerged
                                       PEFT model, plus "loss" (transformers' causal-LM loss with
                                       labels = input_ids) and "grad.<key>", its gradient w.r.t. each
                                       adapter tensor
Cases:
  emb_lora      untied; target_modules [embed_tokens], r 4, alpha 8
  tokens        untied; target_modules [q_proj], trainable_token_indices [3, 7, 60]
  combined      untied; embed_tokens, q_proj, v_proj with rank_pattern / alpha_pattern / use_rslora,
                trainable_token_indices {"lm_head": [0, 5, 63]}
  tied_tokens   tied; target_modules [q_proj], trainable_token_indices [2, 9] (lm_head follows)
  tied_emb_lora tied; target_modules [embed_tokens, v_proj] (PEFT warns; its merge changes the
                shared weight, so the merged lm_head changes too)
Run with torch, transformers and peft installed; the tests never need python.
"""
import json
import os
import shutil
import sys
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
import peft
import transformers

SEED = 2025
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "data", "models",
                                                          "embeddings")


def base_model(tied):
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in n:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return m.eval()


CASES = {
    "emb_lora": dict(tied=False, cfg=dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])),
    "tokens": dict(tied=False, cfg=dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[3, 7, 60])),
    "combined": dict(tied=False, cfg=dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["embed_tokens", "q_proj", "v_proj"],
                                          rank_pattern={"embed_tokens": 3}, alpha_pattern={"v_proj": 5},
                                          trainable_token_indices={"lm_head": [0, 5, 63]})),
    "tied_tokens": dict(tied=True, cfg=dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[2, 9])),
    "tied_emb_lora": dict(tied=True, cfg=dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])),
}

INPUT = torch.tensor([[1, 3, 7, 60, 5, 9, 2, 63, 0, 3, 11, 7]])


def main():
    torch.set_default_dtype(torch.float32)
    for tied in (False, True):
        d = os.path.join(OUT, "base_tied" if tied else "base_untied")
        base_model(tied).save_pretrained(d)
    info = {"peft_version": peft.__version__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "seed": SEED, "cases": {}}
    for name, case in CASES.items():
        base_dir = os.path.join(OUT, "base_tied" if case["tied"] else "base_untied")
        m = LlamaForCausalLM.from_pretrained(base_dir).eval()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pm = get_peft_model(m, LoraConfig(**case["cfg"]))
        torch.manual_seed(SEED + len(name))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        pm.eval()
        d = os.path.join(OUT, name)
        pm.save_pretrained(os.path.join(d, "adapter"))
        res = pm(input_ids=INPUT, labels=INPUT)  # the causal-LM loss: mean cross-entropy of the next token
        out, loss = res.logits, res.loss
        pm.zero_grad()
        loss.backward()
        ref = {"input_ids": INPUT.clone(), "logits": out.detach().clone(), "loss": loss.detach().reshape(1)}
        for n, p in pm.named_parameters():
            if p.requires_grad and p.grad is not None:
                ref["grad." + n] = p.grad.detach().clone()
        save_file(ref, os.path.join(d, "logits.safetensors"))
        merged = pm.merge_and_unload()
        tmp = os.path.join(d, "merged_model")
        merged.save_pretrained(tmp)
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as got, \
                safe_open(os.path.join(base_dir, "model.safetensors"), "pt") as base:
            assert sorted(got.keys()) == sorted(base.keys()), "merging changed the set of tensors"
            changed = {k: got.get_tensor(k) for k in got.keys() if not torch.equal(got.get_tensor(k), base.get_tensor(k))}
        save_file(changed, os.path.join(d, "merged.safetensors"))
        shutil.rmtree(tmp)
        # Neutral paths in the committed config; PEFT's model card is not needed.
        os.remove(os.path.join(d, "adapter", "README.md"))
        cfg_path = os.path.join(d, "adapter", "adapter_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = os.path.basename(base_dir)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        info["cases"][name] = {"tied": case["tied"], "config": case["cfg"],
                               "warnings": sorted({str(x.message).splitlines()[0][:160] for x in w})}
    with open(os.path.join(OUT, "case.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
