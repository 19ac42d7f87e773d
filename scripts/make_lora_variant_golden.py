#!/usr/bin/env python3
"""Reference data for the LoRA variants PEFT has beside DoRA that adapt and merge linear layers:
VeLoRA, MonteCLoRA (training-time variants: at inference and in merges a plain LoRA), BD-LoRA
(block-diagonal A or B) and KaSA (the base's r smallest singular components dropped, a trainable
diagonal between A and B); and OSF (peft_type OSF: the base's smaller singular components
trained), which peft-cpp loads as the LoRA it equals.

For each case, on the tiny Llama of tests/data/models/llama_lora/base, with HuggingFace PEFT:
  adapter/             the checkpoint PEFT saves (every trainable tensor moved off its initial value)
  merged.safetensors   the adapted weights after merge_and_unload

Run from the repository root:  python3 scripts/make_lora_variant_golden.py
Needs torch, transformers, peft (pip); the tests read only the files it writes.
"""
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from peft.tuners.osf.config import OSFConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "tests", "data", "models", "llama_lora", "base")
OUT = os.path.join(ROOT, "tests", "data", "peft", "lora_variants")

CASES = {
    "velora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], velora_config=VeloraConfig(num_groups=4)),
    "monteclora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], monteclora_config=MontecloraConfig()),
    "bdlora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                   use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj", "o_proj"], target_modules_bd_b=["v_proj"],
                                           nblocks=2)),
    "kasa": dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], kasa_config=KasaConfig(),
                 rank_pattern={"model.layers.1.self_attn.v_proj": 3}),
    "kasa_rslora": dict(r=5, lora_alpha=4, use_rslora=True, target_modules=["o_proj"], kasa_config=KasaConfig()),
    # OSF (its own peft_type): the base's top effective_rank singular components frozen, the rest trained.
    "osf": dict(osf=True, target_modules=["q_proj", "v_proj"], effective_rank=40, rank_pattern={"v_proj": 24}),
}


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    for name, kw in CASES.items():
        torch.manual_seed(3)
        case_dir = os.path.join(OUT, name)
        os.makedirs(case_dir)
        base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        original = {k: v.clone() for k, v in base.state_dict().items()}
        if kw.pop("osf", False):
            pm = get_peft_model(base, OSFConfig(**kw))
        else:
            pm = get_peft_model(base, LoraConfig(lora_dropout=0.0, **kw))
        g = torch.Generator().manual_seed(13)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.3 * (p.abs().mean() + 0.02) * torch.randn(p.shape, generator=g))
        adapter = os.path.join(case_dir, "adapter")
        pm.save_pretrained(adapter)
        readme = os.path.join(adapter, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        cfg_path = os.path.join(adapter, "adapter_config.json")
        with open(cfg_path) as f:
            c = json.load(f)
        c["base_model_name_or_path"] = "tests/data/models/llama_lora/base"  # not this machine's path
        with open(cfg_path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
        merged = pm.merge_and_unload().state_dict()
        changed = {k: v.detach().clone().contiguous() for k, v in merged.items()
                   if not torch.equal(v, original[k])}
        assert changed, name
        save_file(changed, os.path.join(case_dir, "merged.safetensors"))
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("Made by scripts/make_lora_variant_golden.py with torch %s, peft %s, transformers %s.\n"
                % (torch.__version__, __import__("peft").__version__, __import__("transformers").__version__))


if __name__ == "__main__":
    sys.exit(main())
