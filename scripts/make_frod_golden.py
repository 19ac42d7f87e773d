#!/usr/bin/env python3
"""Makes the FRoD golden cases of tests/data/peft/ (frod_*) with HuggingFace PEFT 0.21.2.

Not part of the test suite. The model is x -> relu(layers.0.fc(x)) -> relu(layers.1.fc(.)) ->
head(.): the two fc layers (d, d) are one FRoD category ("fc": they share frod_V, the S indices
and size), head (d_out, d) is another ("head"). The fc stack (2d rows >= d) takes PEFT's QR /
eigh branch for V, head (d_out < d rows) its SVD branch. nn.Linear with bias, or transformers'
Conv1D (GPT-2's layout, fan_in_fan_out) for the *_conv1d case.

PEFT derives U (never saved) in float64 from W and V, rounds it to float32, and keeps it; at
load it recomputes V from the base weights and U from that fresh V BEFORE the saved V is loaded.
This script checks that on this machine the recomputed V equals the saved one exactly, and that
the reloaded model's U equals the U the adapter was created with, so that PEFT's U is the
U = colnorm(W V_saved^-T) peft-cpp computes from the saved V (reference: frod_U.<layer>).

After get_peft_model (float32), the trainable parameters are perturbed: lambda_l *= 1 + 0.3 N(0,1),
the S values = scale N(0,1). The reference is the same model in float64 (.double(): U, V, lambda
and S as saved, exactly), as make_peft_golden.py writes it: x, y, grad_y, grad_x,
layer.<name>.{input,output,grad_output,grad_input}, grad.<parameter>, merged.<name>.{weight,bias}
(merge_and_unload; Conv1D layout for the conv case), y32 (the float32 PEFT model's output),
frod_U.<name> (PEFT's U in float64 storage).

Usage: python3 scripts/make_frod_golden.py [--out tests/data/peft]
"""
import argparse
import copy
import json
import os

import peft
import torch
import torch.nn as nn
from peft import PeftModel, get_peft_config, get_peft_model
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

LAYERS = ("layers.0.fc", "layers.1.fc", "head")


def make_linear(d_in, d_out, conv):
    if not conv:
        return nn.Linear(d_in, d_out)
    m = Conv1D(d_out, d_in)
    with torch.no_grad():  # nn.Linear-like values instead of Conv1D's N(0, 0.02) and zero bias
        b = 1.0 / d_in ** 0.5
        m.weight.uniform_(-b, b)
        m.bias.uniform_(-b, b)
    return m


class Block(nn.Module):
    def __init__(self, d, conv):
        super().__init__()
        self.fc = make_linear(d, d, conv)


class Net(nn.Module):
    def __init__(self, d, d_out, conv):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, conv), Block(d, conv)])
        self.head = make_linear(d, d_out, conv)

    def forward(self, x):
        for b in self.layers:
            x = torch.relu(b.fc(x))
        return self.head(x)


# (case, config, d, d_out, scale)
CASES = [
    ("frod_basic", {"peft_type": "FROD", "sparse_rate": 0.1}, 10, 6, 0.3),
    ("frod_dense_s", {"peft_type": "FROD", "sparse_rate": 0.5, "projection_prng_key": 7}, 8, 11, 0.2),
    ("frod_default_rate", {"peft_type": "FROD"}, 12, 5, 0.3),
    ("frod_conv1d", {"peft_type": "FROD", "sparse_rate": 0.2, "fan_in_fan_out": True}, 9, 7, 0.3),
]


def build(cfg, d, d_out, seed, conv):
    torch.manual_seed(seed)
    net = Net(d, d_out, conv).float()
    base = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    c = dict(cfg)
    c.setdefault("target_modules", ["fc", "head"])
    c["progressbar"] = False
    return net, base, c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "data", "peft"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=5)
    a = ap.parse_args()
    for case, cfg, d, d_out, scale in CASES:
        conv = cfg.get("fan_in_fan_out", False)
        out = os.path.join(a.out, case)
        os.makedirs(out, exist_ok=True)
        net, base, c = build(cfg, d, d_out, a.seed, conv)
        save_file(base, os.path.join(out, "base_model.safetensors"))
        model = get_peft_model(net, get_peft_config(c))
        gen = torch.Generator().manual_seed(a.seed + 1)
        n_trainable = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                n_trainable += p.numel()
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                if "frod_lambda_l" in name:
                    p.copy_((p.double() * (1 + 0.3 * noise)).float())
                else:
                    p.copy_((noise * scale).float())
        model.eval()
        adapter_dir = os.path.join(out, "adapter")
        model.save_pretrained(adapter_dir)
        readme = os.path.join(adapter_dir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)

        # PEFT's U after reloading equals the U the adapter was made with (the fresh V equals the
        # saved V here): PEFT's quirk of computing U before loading V is harmless for this data.
        net2, _, _ = build(cfg, d, d_out, a.seed, conv)
        net2.load_state_dict(base)
        loaded = PeftModel.from_pretrained(net2, adapter_dir)
        for lname in LAYERS:
            l1 = model.base_model.model.get_submodule(lname)
            l2 = loaded.base_model.model.get_submodule(lname)
            assert torch.equal(l1.frod_U["default"], l2.frod_U["default"]), f"{case}: U differs after reload"
            assert torch.equal(l1.frod_V["default"], l2.frod_V["default"]), f"{case}: V differs after reload"
            assert torch.equal(l1.frod_lambda_l["default"], l2.frod_lambda_l["default"])
        for cat, bd in model.base_model.frod_V.items():
            # the saved V is the one U was computed from
            assert torch.equal(bd["default"], loaded.base_model.frod_V[cat]["default"]), f"{case}: V[{cat}]"

        x32 = torch.randn(a.batch, d, generator=gen).float()
        with torch.no_grad():
            y32 = copy.deepcopy(model)(x32).double()
        m64 = copy.deepcopy(model).double()
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
        for lname in LAYERS:
            hooks(lname, inner.get_submodule(lname))
            ref[f"frod_U.{lname}"] = inner.get_submodule(lname).frod_U["default"].detach().clone()
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
            for lname in LAYERS:
                lin = merged.get_submodule(lname)
                ref[f"merged.{lname}.weight"] = lin.weight.detach().clone()
                ref[f"merged.{lname}.bias"] = lin.bias.detach().clone()
            y_merged = merged(x.detach())
        merge_err = ((y_merged - y.detach()).norm() / y.detach().norm()).item()
        save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "reference.safetensors"))
        f32_err = ((y32 - y.detach()).norm() / y.detach().norm()).item()
        info = {
            "method": "frod",
            "peft_version": peft.__version__,
            "torch_version": torch.__version__,
            "dims": {"d": d, "d_out": d_out, "batch": a.batch},
            "model": ("x -> relu(layers.0.fc) -> relu(layers.1.fc) -> head; fc (d, d) x2 share the category "
                      "'fc', head (d_out, d) is 'head'; " + ("transformers' Conv1D (weight (in, out)), merged.* in "
                                                             "that layout" if conv else "nn.Linear") + ", with bias"),
            "config": c,
            "seed": a.seed,
            "scale": scale,
            "trainable_parameters": n_trainable,
            "max_abs_y": float(y.detach().abs().max()),
            "float32_forward_rel_err": f32_err,
            "merged_vs_unmerged_rel_err": merge_err,
            "made_by": "scripts/make_frod_golden.py",
        }
        with open(os.path.join(out, "case.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(f"{case}: {n_trainable} trainable, f32 {f32_err:.2e}, merged vs unmerged {merge_err:.2e}")


if __name__ == "__main__":
    main()
