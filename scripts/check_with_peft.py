#!/usr/bin/env python3
"""Shows that HuggingFace PEFT loads the checkpoints peft-cpp writes, for every golden case.

Not part of the test suite (it needs PyTorch and PEFT: `pip install torch peft`). Usage, from
the repository root after a build:

    build/examples/resave_checkpoint tests/data/peft/lora/adapter /tmp/rt/lora ...
    python3 scripts/check_with_peft.py /tmp/rt lora dora vera ...

or just `python3 scripts/check_with_peft.py` to resave and check every case of CASES with the binary
in build/examples. Each case: the base model of tests/data/peft/<case>, PeftModel.from_pretrained
on the re-saved adapter, its output on the golden x against the golden y (float64).
"""
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.nn as nn
from peft import PeftModel
from safetensors.torch import load_file

CASES = ["lora", "lora_rslora", "lora_bias", "lora_rank_pattern", "dora", "vera", "randlora", "shira", "lokr",
         "lokr_full", "loha", "adalora", "ia3", "vblora", "oft", "oft_neumann", "oft_block_share", "hra",
         "hra_gs", "miss", "miss_bat", "miss_mini", "c3a", "c3a_b32", "gralora", "gralora_hybrid", "hira",
         "hira_r4", "fourierft", "fourierft_seed", "road_1", "road_2", "road_4",
         "delora", "delora_lambda", "boft", "boft_butterfly2", "beft", "pvera", "pvera_r4", "unilora", "waveft",
         "waveft_coif2", "waveft_direct", "tinylora", "tinylora_r4", "glora",
         "glora_vector", "glora_none", "deft_relu", "deft_relu_alpha", "deft_qr", "deft_qr_alpha",
         "deft_para_relu", "deft_para_qr", "deft_conv1d", "peanut_relu", "peanut_gelu_depth2",
         "peanut_tanh_gelu_depth1", "peanut_silu_depth3", "peanut_sigmoid", "peanut_tanh_depth2",
         "supertuning_super", "supertuning_bottom", "supertuning_supra", "supertuning_supra_alpha",
         "supertuning_full"]
# PEFT's own FourierFT layer builds its delta in float32 and fails in a float64 model: these
# cases are checked in float32 against the float64 reference (tolerance 1e-5).
FLOAT32_CASES = {"fourierft", "fourierft_seed"}
# PEFT computes C3A's term in float32 whatever the model's dtype: 3-4e-9 from the reference.
TOLERANCE = {"c3a": 1e-7, "c3a_b32": 1e-7}
# Likewise DeFT's (layer.py casts to torch.float32): 1-3e-7 from the reference (case.json's
# peft_float32_rel_err).
TOLERANCE.update({c: 1e-6 for c in CASES if c.startswith("deft_")})
# Cases whose up and down are transformers' Conv1D (GPT-2's layout), not nn.Linear.
CONV1D_CASES = {"deft_conv1d"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    """The golden cases' model: y = down(relu(up(x)))."""

    def __init__(self, d_in=64, d_h=96, d_out=48, conv1d=False):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            self.up, self.down = Conv1D(d_h, d_in), Conv1D(d_out, d_h)
        else:
            self.up = nn.Linear(d_in, d_h)
            self.down = nn.Linear(d_h, d_out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def check(case, saved_dir):
    data = os.path.join(ROOT, "tests", "data", "peft", case)
    f32 = case in FLOAT32_CASES
    dt = torch.float32 if f32 else torch.float64
    tol = 1e-5 if f32 else TOLERANCE.get(case, 1e-9)
    torch.set_default_dtype(dt)
    with open(os.path.join(data, "case.json")) as f:
        dims = json.load(f)["dims"]
    net = Net(dims["d_in"], dims["d_h"], dims["d_out"], case in CONV1D_CASES).to(dt)
    net.load_state_dict({k: v.to(dt) for k, v in load_file(os.path.join(data, "base_model.safetensors")).items()})
    ref = load_file(os.path.join(data, "reference.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(net, saved_dir).to(dt).eval()
    with torch.no_grad():
        y = model(ref["x"].to(dt)).double()
    err = ((y - ref["y"]).norm() / ref["y"].norm()).item()
    notes = [str(w.message)[:90] for w in caught if "missing" in str(w.message).lower()]
    print(f"{case:18s} relative error {err:.2e}  {'ok' if err < tol else 'MISMATCH'}  {' '.join(notes)}")
    return err < tol


def main():
    torch.set_default_dtype(torch.float64)
    if len(sys.argv) > 2:
        saved_root, cases = sys.argv[1], sys.argv[2:]
    else:
        saved_root, cases = tempfile.mkdtemp(prefix="peft_cpp_roundtrip_"), CASES
        tool = os.path.join(ROOT, "build", "examples", "resave_checkpoint")
        args = []
        for c in cases:
            args += [os.path.join(ROOT, "tests", "data", "peft", c, "adapter"), os.path.join(saved_root, c)]
        subprocess.run([tool] + args, check=True, stdout=subprocess.DEVNULL)
    ok = all([check(c, os.path.join(saved_root, c)) for c in cases])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
