#!/usr/bin/env python3
"""LoRA+ training traces for tests/train/test_loraplus.cpp, made with PEFT's create_loraplus_optimizer.

Not part of the test suite (needs torch, peft, transformers). For each golden case given (default:
lora_bias dora), loads tests/data/peft/<case> (base + adapter) in float64, trains three steps of
torch.optim.AdamW through peft.optimizers.create_loraplus_optimizer(lr=1e-2, loraplus_lr_ratio=16,
loraplus_weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8) on the loss mean((y - target)^2) and
writes tests/data/peft/<case>/trace_loraplus.safetensors in the format of trace.safetensors:
x, target, loss.<k> (before step k), step<k>.<PyTorch parameter name> (after step k).
"""
import os
import sys

import torch
import torch.nn as nn
from peft import PeftModel
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 48)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def trace(case):
    data = os.path.join(ROOT, "tests", "data", "peft", case)
    net = Net().double()
    net.load_state_dict({k: v.double() for k, v in load_file(os.path.join(data, "base_model.safetensors")).items()})
    model = PeftModel.from_pretrained(net, os.path.join(data, "adapter"), is_trainable=True).double()
    model.train()
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0,
                                    loraplus_weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(77)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64)
    target = torch.randn(5, 48, generator=g, dtype=torch.float64)
    out = {"x": x, "target": target}
    for k in range(3):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        out[f"loss.{k}"] = loss.detach().reshape(1).clone()
        opt.step()
        for name, p in model.named_parameters():
            if p.requires_grad:
                out[f"step{k}.{name}"] = p.detach().clone()
    groups = [(len(gr["params"]), gr["lr"], gr["weight_decay"]) for gr in opt.param_groups]
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(data, "trace_loraplus.safetensors"))
    print(f"{case}: groups (tensors, lr, weight_decay) {groups}")


if __name__ == "__main__":
    for c in sys.argv[1:] or ["lora_bias", "dora"]:
        trace(c)
