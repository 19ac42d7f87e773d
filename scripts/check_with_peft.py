#!/usr/bin/env python3
"""Shows that HuggingFace PEFT loads the checkpoints peft-cpp writes, for every golden case.

Not part of the test suite (it needs PyTorch and PEFT: `pip install torch peft`). Usage, from
the repository root after a build:

    build/examples/resave_checkpoint tests/data/peft/lora/adapter /tmp/rt/lora ...
    python3 scripts/check_with_peft.py /tmp/rt lora dora vera ...

or just `python3 scripts/check_with_peft.py` to resave and check all 13 cases with the binary
in build/examples. Each case: the base model of tests/data/peft/<case>, PeftModel.from_pretrained
on the re-saved adapter, its output on the golden x against the golden y (float64).
"""
import os
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.nn as nn
from peft import PeftModel
from safetensors.torch import load_file

CASES = ["lora", "lora_rslora", "lora_bias", "lora_rank_pattern", "dora", "vera", "randlora", "shira",
         "lokr", "lokr_full", "loha", "adalora", "ia3", "hra", "hra_gs", "boft",
         "boft_butterfly2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    """The golden cases' model: y = down(relu(up(x)))."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 48)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def check(case, saved_dir):
    data = os.path.join(ROOT, "tests", "data", "peft", case)
    net = Net().double()
    net.load_state_dict({k: v.double() for k, v in load_file(os.path.join(data, "base_model.safetensors")).items()})
    ref = load_file(os.path.join(data, "reference.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(net, saved_dir).double().eval()
    with torch.no_grad():
        y = model(ref["x"])
    err = ((y - ref["y"]).norm() / ref["y"].norm()).item()
    notes = [str(w.message)[:90] for w in caught if "missing" in str(w.message).lower()]
    print(f"{case:18s} relative error {err:.2e}  {'ok' if err < 1e-9 else 'MISMATCH'}  {' '.join(notes)}")
    return err < 1e-9


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
