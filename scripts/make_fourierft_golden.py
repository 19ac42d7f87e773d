#!/usr/bin/env python3
"""make_peft_golden.py for FourierFT, with the float64 reference computed in float64.

PEFT 0.21's FourierFTLayer.get_delta_weight scatters the spectrum into a float32 matrix and runs
torch.fft.ifft2 in float32 whatever the model's dtype, so the float64 pass of make_peft_golden.py
would carry float32 rounding (~1e-7) and could not hold the double implementation to 1e-12. This
wrapper replaces get_delta_weight by the same computation in the spectrum's own dtype (float64 in
the reference pass; float32 in the float32 pass, where it is PEFT's computation exactly) and then
runs make_peft_golden.py with the same arguments. The adapter saved is PEFT's own.

Usage: python3 scripts/make_fourierft_golden.py CASE '{"peft_type": "FOURIERFT", ...}' [make_peft_golden options]
"""
import json
import os
import sys

import torch
from peft.tuners.fourierft.layer import FourierFTLayer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_peft_golden  # noqa: E402


def delta_weight_in_own_dtype(self, adapter):
    spectrum = self.fourierft_spectrum[adapter]
    indices = self.indices[adapter].to(spectrum.device)
    dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device, dtype=spectrum.dtype)
    dense[indices[0, :], indices[1, :]] = spectrum
    return torch.fft.ifft2(dense).real * self.fourierft_scaling[adapter]


if __name__ == "__main__":
    FourierFTLayer.get_delta_weight = delta_weight_in_own_dtype
    make_peft_golden.main()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out_flag = sys.argv.index("--out") + 1 if "--out" in sys.argv else None
    root = sys.argv[out_flag] if out_flag else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                            "tests", "data", "peft")
    case_json = os.path.join(root, args[0], "case.json")
    with open(case_json) as f:
        case = json.load(f)
    case["made_by"] = "scripts/make_fourierft_golden.py (float64 reference: ifft2 in float64)"
    with open(case_json, "w") as f:
        json.dump(case, f, indent=1)
