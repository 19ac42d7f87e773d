#!/usr/bin/env python3
"""Makes one golden case of tests/data/peft/ with HuggingFace PEFT (pip: torch, peft).

Not part of the test suite: it writes the data the tests read. The cases are the format of
../shared/golden/README.md: the two-layer MLP y = down(relu(up(x))) (up d_in -> d_h, down d_h ->
d_out, nn.Linear with bias), both linears adapted, every trainable adapter parameter set to random
non-zero values, then

    base_model.safetensors   the frozen F32 base
    adapter/                 PEFT's save_pretrained (F32)
    reference.safetensors    F64: x, y, grad_y, grad_x, layer.<up|down>.{input,output,grad_output,
                             grad_input}, grad.<parameter> (PyTorch's names, with ".default"),
                             merged.<up|down>.{weight,bias} (merge_and_unload), y32
    case.json                shapes, seed, versions, trainable parameter count

Usage:
    python3 scripts/make_peft_golden.py CASE '{"peft_type": "OFT", "r": 0, "oft_block_size": 16, ...}'
        [--dims 64,96,48] [--batch 5] [--seed 1234] [--scale 0.1] [--out tests/data/peft]

target_modules defaults to ["up", "down"]. --scale is the standard deviation of the random
parameter values (a method may need smaller ones to stay well conditioned).
"""
import argparse
import copy
import json
import os

import numpy as np
import peft
import torch
import torch.nn as nn
from peft import get_peft_config, get_peft_model
from safetensors.torch import save_file


class Net(nn.Module):
    def __init__(self, d_in, d_h, d_out):
        super().__init__()
        self.up = nn.Linear(d_in, d_h)
        self.down = nn.Linear(d_h, d_out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("config", help="PEFT config as JSON (peft_type and the method's fields)")
    ap.add_argument("--dims", default="64,96,48")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "data", "peft"))
    a = ap.parse_args()
    d_in, d_h, d_out = (int(v) for v in a.dims.split(","))
    cfg = json.loads(a.config)
    cfg.setdefault("target_modules", ["up", "down"])
    out = os.path.join(a.out, a.case)
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(a.seed)
    net = Net(d_in, d_h, d_out).float()
    base = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(base, os.path.join(out, "base_model.safetensors"))

    model = get_peft_model(net, get_peft_config(cfg))
    gen = torch.Generator().manual_seed(a.seed + 1)
    n_trainable = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * a.scale).float())
                n_trainable += p.numel()
    model.eval()
    model.save_pretrained(os.path.join(out, "adapter"))

    x32 = torch.randn(a.batch, d_in, generator=gen).float()
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():  # on a copy: some layers change their parameters in forward (OFT's coft)
        y32 = copy.deepcopy(model)(x32).double()

    x = x32.double().clone().requires_grad_(True)
    grad_y = torch.randn(a.batch, d_out, generator=gen, dtype=torch.float64)
    ref = {}

    def hooks(tag, module):
        def fwd(_m, inp, outp):
            ref[f"layer.{tag}.input"] = inp[0].detach().clone()
            ref[f"layer.{tag}.output"] = outp.detach().clone()

        def bwd(_m, gin, gout):
            ref[f"layer.{tag}.grad_input"] = gin[0].detach().clone()
            ref[f"layer.{tag}.grad_output"] = gout[0].detach().clone()

        module.register_forward_hook(fwd)
        module.register_full_backward_hook(bwd)

    inner = m64.base_model.model
    hooks("up", inner.up)
    hooks("down", inner.down)
    y = m64(x)
    (y * grad_y).sum().backward()
    ref["x"] = x.detach().clone()
    ref["y"] = y.detach().clone()
    ref["y32"] = y32
    ref["grad_y"] = grad_y
    ref["grad_x"] = x.grad.detach().clone()
    for name, p in m64.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            ref[f"grad.{name}"] = p.grad.detach().clone()

    merged = copy.deepcopy(m64)
    with torch.no_grad():
        merged = merged.merge_and_unload()
        for tag in ("up", "down"):
            lin = getattr(merged, tag)
            ref[f"merged.{tag}.weight"] = lin.weight.detach().clone()
            ref[f"merged.{tag}.bias"] = lin.bias.detach().clone()
        y_merged = merged(x.detach())
    merge_err = ((y_merged - y.detach()).norm() / y.detach().norm()).item()

    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "reference.safetensors"))
    f32_err = ((y32 - y.detach()).norm() / y.detach().norm()).item()
    case = {
        "method": cfg["peft_type"].lower(),
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "dims": {"d_in": d_in, "d_h": d_h, "d_out": d_out, "batch": a.batch},
        "model": "y = down(relu(up(x))); up and down are nn.Linear with bias; both adapted",
        "config": cfg,
        "seed": a.seed,
        "scale": a.scale,
        "trainable_parameters": n_trainable,
        "max_abs_y": float(y.detach().abs().max()),
        "float32_forward_rel_err": f32_err,
        "merged_vs_unmerged_rel_err": merge_err,
        "made_by": "scripts/make_peft_golden.py",
    }
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(case, f, indent=1)
    print(f"{a.case}: {n_trainable} trainable, max |y| {case['max_abs_y']:.3g}, "
          f"f32 rel err {f32_err:.2e}, merged vs unmerged {merge_err:.2e} -> {out}")


if __name__ == "__main__":
    main()
