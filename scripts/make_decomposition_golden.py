#!/usr/bin/env python3
"""Reference data for LoRA initialisations that decompose the base weight (PiSSA, OLoRA).

For each case, on the tiny Llama of tests/data/models/llama_lora/base, with HuggingFace PEFT:
  residual.safetensors  the adapted weights of the residual base PEFT's init leaves (before training)
  unconverted/          the adapter after a simulated training step, saved as PEFT saves it by
                        default (init_lora_weights still "pissa"/"olora": relative to the residual)
  converted/            the same saved with path_initial_model_for_weight_conversion (rank 2r,
                        relative to the original base)
  merged.safetensors    the adapted weights after merge_and_unload (the full fine-tuned model)

Run from the repository root:  python3 scripts/make_decomposition_golden.py
Needs torch, transformers, peft (pip); the tests read only the files it writes.
"""
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "tests", "data", "models", "llama_lora", "base")
OUT = os.path.join(ROOT, "tests", "data", "peft", "decomposed")

CASES = {
    "pissa": dict(init_lora_weights="pissa", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "olora": dict(init_lora_weights="olora", r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                  rank_pattern={"model.layers.1.self_attn.v_proj": 3}),
    "pissa_rslora": dict(init_lora_weights="pissa", r=6, lora_alpha=4, use_rslora=True,
                         target_modules=["q_proj", "o_proj"]),
}


def adapted_weights(model, cfg):
    """The base weights of the adapted modules, by their name in the base model."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            key = name.replace("base_model.model.", "", 1) + ".weight"
            out[key] = mod.base_layer.weight.detach().clone().contiguous()
    return out


def main():
    torch.manual_seed(7)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    for name, kw in CASES.items():
        case_dir = os.path.join(OUT, name)
        os.makedirs(case_dir)
        base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        cfg = LoraConfig(lora_dropout=0.0, **kw)
        pm = get_peft_model(base, cfg)
        save_file(adapted_weights(pm, cfg), os.path.join(case_dir, "residual.safetensors"))
        # The initial adapter, as PEFT's docs save it for the conversion.
        init_dir = os.path.join(case_dir, "initial")
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(init_dir)
        pm.peft_config["default"].init_lora_weights = kw["init_lora_weights"]
        # "Training": move A and B away from their initial values.
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n or "lora_B" in n:
                    p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
        pm.save_pretrained(os.path.join(case_dir, "unconverted"))
        pm.save_pretrained(os.path.join(case_dir, "converted"), path_initial_model_for_weight_conversion=init_dir)
        shutil.rmtree(init_dir)
        merged = pm.merge_and_unload()
        sd = merged.state_dict()
        changed = {}
        for k in load_names(os.path.join(case_dir, "residual.safetensors")):
            changed[k] = sd[k].detach().clone().contiguous()
        save_file(changed, os.path.join(case_dir, "merged.safetensors"))
        for sub in ("unconverted", "converted"):
            p = os.path.join(case_dir, sub, "README.md")
            if os.path.exists(p):
                os.remove(p)
            p = os.path.join(case_dir, sub, "adapter_config.json")
            with open(p) as f:
                c = json.load(f)
            c["base_model_name_or_path"] = "tests/data/models/llama_lora/base"  # not this machine's path
            with open(p, "w") as f:
                json.dump(c, f, indent=2, sort_keys=True)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("Made by scripts/make_decomposition_golden.py with torch %s, peft %s, transformers %s.\n"
                % (torch.__version__, __import__("peft").__version__, __import__("transformers").__version__))


def load_names(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return list(f.keys())


if __name__ == "__main__":
    sys.exit(main())
