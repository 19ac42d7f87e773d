#!/usr/bin/env python3
"""Makes the DeFT golden cases of tests/data/peft/ (deft_*) with HuggingFace PEFT 0.21.2.

Not part of the test suite. Each case is made by scripts/make_peft_golden.py (the two-layer MLP
y = down(relu(up(x))), both linears adapted, every trainable parameter random; its README in the
docstring there) with two changes:

  * PEFT's DeFT layer computes in float32 whatever the model's dtype (`_project`, `forward` and
    `reset_deft_parameters` cast to torch.float32). For a float64 reference (what the tests
    compare with at 1e-10) the module-level name `torch` of peft/tuners/deft/layer.py is replaced
    by a proxy whose `float32` is torch.float64; every other attribute is torch's. The code run is
    PEFT's, only in double. y32 (the float32 model's output) is then float32 in and out with the
    adapter term in double; case.json's peft_float32_rel_err is the plain float32 PEFT's output
    against the double reference.
  * deft_conv1d: up and down are transformers' Conv1D (GPT-2's layout, weight (in, out),
    fan_in_fan_out). base_model.safetensors and merged.* hold the Conv1D (in, out) layout.

Usage: python3 scripts/make_deft_golden.py [--out tests/data/peft]
"""
import argparse
import copy
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_peft_golden  # noqa: E402
import peft.tuners.deft.layer as deft_layer  # noqa: E402
from peft import get_peft_config, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

_torch = torch


class _Torch64:
    """torch with float32 meaning float64 (PEFT's DeFT layer then computes in double)."""
    float32 = _torch.float64

    def __getattr__(self, k):
        return getattr(_torch, k)


class ConvNet(nn.Module):
    def __init__(self, d_in, d_h, d_out):
        super().__init__()
        self.up = Conv1D(d_h, d_in)
        self.down = Conv1D(d_out, d_h)
        with torch.no_grad():  # Conv1D starts with zero bias and N(0, 0.02) weights: make them like nn.Linear's
            for m, fan_in in ((self.up, d_in), (self.down, d_h)):
                b = 1.0 / fan_in ** 0.5
                m.weight.uniform_(-b, b)
                m.bias.uniform_(-b, b)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


# (case, config, dims, scale). dims 12,10,6: up is (10, 12), down (6, 10); r = 8 is capped to 6
# on down (PEFT's min(r, out_features)).
CASES = [
    ("deft_relu", {"peft_type": "DEFT", "r": 8, "init_weights": False}, "12,10,6", 0.3),
    ("deft_relu_alpha", {"peft_type": "DEFT", "r": 4, "alpha": 16}, "12,10,6", 0.3),
    ("deft_qr", {"peft_type": "DEFT", "r": 4, "decomposition_method": "qr", "init_weights": False}, "12,10,6", 0.3),
    ("deft_qr_alpha", {"peft_type": "DEFT", "r": 8, "decomposition_method": "qr", "alpha": 4}, "12,10,6", 0.3),
    ("deft_para_relu", {"peft_type": "DEFT", "r": 4, "para": True}, "12,10,6", 0.3),
    ("deft_para_qr", {"peft_type": "DEFT", "r": 4, "decomposition_method": "qr", "para": True}, "12,10,6", 0.3),
    ("deft_conv1d", {"peft_type": "DEFT", "r": 4, "alpha": 8, "fan_in_fan_out": True}, "12,10,6", 0.3),
]


def float32_error(out_dir, cfg, dims, scale, seed, conv):
    """PEFT as it is (float32 adapter math) on the float32 model against the double reference."""
    d_in, d_h, d_out = (int(v) for v in dims.split(","))
    torch.manual_seed(seed)
    net = (ConvNet if conv else make_peft_golden.Net)(d_in, d_h, d_out).float()
    c = dict(cfg)
    c.setdefault("target_modules", ["up", "down"])
    model = get_peft_model(net, get_peft_config(c))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).float())
    model.eval()
    x32 = torch.randn(5, d_in, generator=gen).float()
    from safetensors.torch import load_file
    ref = load_file(os.path.join(out_dir, "reference.safetensors"))
    assert torch.equal(x32.double(), ref["x"]), "the float32 run does not see the reference's input"
    with torch.no_grad():
        y = model(x32).double()
    return ((y - ref["y"]).norm() / ref["y"].norm()).item()


# Cases whose init.safetensors records PEFT's own initialisation (init_weights true, PEFT as
# shipped: float32): <layer>.deft_P and <layer>.deft_R right after get_peft_model, before the
# parameters are randomized. R = right^T W0 / s there (the adapter is a no-op).
INIT_CASES = {"deft_relu_alpha", "deft_qr_alpha"}


def save_init(out_dir, cfg, dims, seed):
    from safetensors.torch import save_file
    d_in, d_h, d_out = (int(v) for v in dims.split(","))
    torch.manual_seed(seed)
    net = make_peft_golden.Net(d_in, d_h, d_out).float()
    c = dict(cfg)
    c.setdefault("target_modules", ["up", "down"])
    model = get_peft_model(net, get_peft_config(c))
    t = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # base_model.model.<layer>.deft_<P|R>.default
            parts = name.split(".")
            t[f"{parts[2]}.{parts[3]}"] = p.detach().clone().contiguous()
    save_file(t, os.path.join(out_dir, "init.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "data", "peft"))
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    linear_net = make_peft_golden.Net
    for case, cfg, dims, scale in CASES:
        conv = cfg.get("fan_in_fan_out", False)
        make_peft_golden.Net = ConvNet if conv else linear_net
        deft_layer.torch = _Torch64()
        sys.argv = ["make_peft_golden.py", case, json.dumps(cfg), "--dims", dims, "--scale", str(scale),
                    "--seed", str(a.seed), "--out", a.out]
        make_peft_golden.main()
        deft_layer.torch = _torch
        out = os.path.join(a.out, case)
        err = float32_error(out, cfg, dims, scale, a.seed, conv)
        with open(os.path.join(out, "case.json")) as f:
            info = json.load(f)
        info["made_by"] = "scripts/make_deft_golden.py (make_peft_golden.py, PEFT's DeFT layer run in float64)"
        info["peft_float32_rel_err"] = err
        if conv:
            info["model"] = ("y = down(relu(up(x))); up and down are transformers' Conv1D (weight (in, out)) "
                             "with bias; both adapted; base_model and merged.* in Conv1D layout")
        with open(os.path.join(out, "case.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(f"  PEFT float32 vs double reference: {err:.2e}")
        if case in INIT_CASES:
            save_init(out, cfg, dims, a.seed)
    make_peft_golden.Net = linear_net


if __name__ == "__main__":
    main()
