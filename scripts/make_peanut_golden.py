#!/usr/bin/env python3
"""Makes the PEANuT golden cases of tests/data/peft/ (peanut_*) with HuggingFace PEFT 0.21.2.

Not part of the test suite. Each case is scripts/make_peft_golden.py's (the two-layer MLP
y = down(relu(up(x))), nn.Linear with bias, both adapted, every trainable parameter random)
run with the case's config; PEANuT computes its delta in the adapter's dtype, so the float64
model is PEFT's own double computation. PEFT supports only nn.Linear for PEANuT (no Conv1D case).
The model cards (adapter/README.md) are removed.

Usage: python3 scripts/make_peanut_golden.py [--out tests/data/peft]
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (case, config, dims, scale). dims d_in,d_h,d_out: up (d_h, d_in), down (d_out, d_h).
CASES = [
    ("peanut_relu", {"peft_type": "PEANUT", "r": 4, "init_weights": False}, "12,10,6", 0.3),
    ("peanut_gelu_depth2", {"peft_type": "PEANUT", "r": 4, "depth": 2, "act_fn": "gelu", "scaling": 0.5},
     "12,10,6", 0.3),
    ("peanut_tanh_gelu_depth1", {"peft_type": "PEANUT", "r": 3, "depth": 1, "act_fn": "gelu_pytorch_tanh"},
     "8,16,12", 0.3),
    ("peanut_silu_depth3", {"peft_type": "PEANUT", "r": 5, "depth": 3, "act_fn": "silu", "scaling": 2.0},
     "12,10,6", 0.3),
    ("peanut_sigmoid", {"peft_type": "PEANUT", "r": 2, "depth": 1, "act_fn": "sigmoid", "scaling": 0.75},
     "9,7,5", 0.3),
    ("peanut_tanh_depth2", {"peft_type": "PEANUT", "r": 3, "depth": 2, "act_fn": "tanh"}, "12,10,6", 0.3),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "data", "peft"))
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    for case, cfg, dims, scale in CASES:
        subprocess.run([sys.executable, os.path.join(HERE, "make_peft_golden.py"), case, json.dumps(cfg),
                        "--dims", dims, "--scale", str(scale), "--seed", str(a.seed), "--out", a.out], check=True)
        card = os.path.join(a.out, case, "adapter", "README.md")
        if os.path.exists(card):
            os.remove(card)


if __name__ == "__main__":
    main()
