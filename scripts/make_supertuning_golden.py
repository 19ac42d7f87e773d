#!/usr/bin/env python3
"""Makes the Super-Tuning golden cases of tests/data/peft/ (supertuning_*) with HuggingFace PEFT 0.21.2.

Not part of the test suite. Each case is made by scripts/make_peft_golden.py (the two-layer MLP
y = down(relu(up(x))), both nn.Linear layers adapted, every trainable parameter random: the sparse
values and, with r, the LoRA factors; its README is the docstring there). The indices are PEFT's
own: torch.topk of |W0| on the float32 base (uniform random weights: no ties), saved as int32
(save_precomputed_indices, the default). PEFT's Super-Tuning layer computes in the weight's dtype
(the LoRA factors are parameters, cast with the model), so the float64 copy is PEFT run in double.
The auto-generated model card adapter/README.md is removed.

Cases: pure Super (r None) with the top or the bottom of |W0|, Supra (r set) with PEFT's default
lora_alpha = 2 r and with an explicit one, and sparsity 0 (every entry trainable). k is
int(out * in * (1 - sparsity)) in double: supertuning_super's 0.9 gives 11 of 120 entries, not 12.

Usage: python3 scripts/make_supertuning_golden.py [--out tests/data/peft]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_peft_golden  # noqa: E402

# (case, config, dims, scale, seed)
CASES = [
    ("supertuning_super", {"peft_type": "SUPERTUNING", "sparsity": 0.9}, "12,10,6", 0.3, 1234),
    ("supertuning_bottom", {"peft_type": "SUPERTUNING", "sparsity": 0.7, "select_top": False}, "9,14,5", 0.3, 77),
    ("supertuning_supra", {"peft_type": "SUPERTUNING", "sparsity": 0.8, "r": 4}, "12,10,6", 0.3, 4321),
    ("supertuning_supra_alpha", {"peft_type": "SUPERTUNING", "sparsity": 0.95, "r": 2, "lora_alpha": 3},
     "16,11,7", 0.3, 99),
    ("supertuning_full", {"peft_type": "SUPERTUNING", "sparsity": 0.0, "r": 3, "select_top": False},
     "7,9,4", 0.2, 2026),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "data", "peft"))
    a = ap.parse_args()
    for case, cfg, dims, scale, seed in CASES:
        sys.argv = ["make_peft_golden.py", case, json.dumps(cfg), "--dims", dims, "--scale", str(scale),
                    "--seed", str(seed), "--out", a.out]
        make_peft_golden.main()
        out = os.path.join(a.out, case)
        card = os.path.join(out, "adapter", "README.md")
        if os.path.exists(card):
            os.remove(card)
        with open(os.path.join(out, "case.json")) as f:
            info = json.load(f)
        info["made_by"] = "scripts/make_supertuning_golden.py (make_peft_golden.py)"
        with open(os.path.join(out, "case.json"), "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
