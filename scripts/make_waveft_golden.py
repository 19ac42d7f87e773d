#!/usr/bin/env python3
"""Makes tests/data/peft/waveft_transforms.json: PEFT 0.21's WaveFT delta weight and spectrum
gradient on small layers, for every wavelet PEFT can reconstruct with and for use_idwt=False.

Not part of the test suite. The two-layer golden cases (make_peft_golden.py: waveft,
waveft_coif2, waveft_direct) have fixed even sizes; these add odd sizes, a single row or column,
layers smaller than the filter, and every wavelet family member. Each entry: the config, the
layer's (out, in), the spectrum, PEFT's locations, get_delta_weight() in float64, a random G and
the autograd gradient of sum(G * delta) with respect to the spectrum.

Usage: python3 scripts/make_waveft_golden.py [--out tests/data/peft/waveft_transforms.json]
"""
import argparse
import json
import os

import torch
from peft.tuners.waveft.config import WaveFTConfig
from peft.tuners.waveft.layer import WaveFTLinear
from peft.tuners.waveft.wavelet import wavelist

# (out, in) shapes, used in turn: odd, single row / column, smaller than the longest filters.
SHAPES = [(7, 5), (1, 3), (13, 1), (6, 9), (4, 2), (11, 8), (5, 5), (2, 17)]


def one(family, use_idwt, out, inn, seed, gen):
    n = max(1, (out * inn * 2) // 3)
    cfg = WaveFTConfig(n_frequency=n, wavelet_family=family, use_idwt=use_idwt, random_loc_seed=seed,
                       scaling=1.5, target_modules=["x"])
    layer = WaveFTLinear(torch.nn.Linear(inn, out).double(), "default", config=cfg, n_frequency=n).double()
    spec = layer.waveft_spectrum["default"]
    with torch.no_grad():
        spec.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
    delta = layer.get_delta_weight("default")
    g = torch.randn(out, inn, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((delta * g).sum(), spec)
    idx = layer.waveft_indices["default"]
    return {"wavelet_family": family, "use_idwt": use_idwt, "random_loc_seed": seed, "scaling": 1.5,
            "out": out, "in": inn, "n_frequency": n, "rows": idx[0].tolist(), "cols": idx[1].tolist(),
            "spectrum": spec.detach().tolist(), "delta": delta.detach().flatten().tolist(),
            "g": g.flatten().tolist(), "grad": grad.tolist()}


def main():
    ap = argparse.ArgumentParser()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "tests", "data", "peft", "waveft_transforms.json"))
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(4321)
    # haar is not a WaveFTConfig name; PEFT's coif5 table has 48 taps for a padding of 30: its
    # get_delta_weight has the wrong shape on every layer (checked here), so it has no case.
    families = [f for f in wavelist() if f not in ("haar", "coif5")]
    try:
        one("coif5", True, 40, 40, 1, torch.Generator().manual_seed(0))
        raise SystemExit("PEFT's coif5 works now: add it to the cases and to peft-cpp")
    except RuntimeError:
        pass
    cases = []
    for i, fam in enumerate(families):
        out, inn = SHAPES[i % len(SHAPES)]
        cases.append(one(fam, True, out, inn, 100 + i, gen))
    # The longest filter on a larger layer, and the direct placement (any family name).
    cases.append(one("coif4", True, 19, 23, 7, gen))
    cases.append(one("db20", False, 7, 5, 8, gen))
    cases.append(one("db1", False, 1, 3, 9, gen))
    import peft
    doc = {"made_by": "scripts/make_waveft_golden.py", "peft_version": peft.__version__,
           "torch_version": torch.__version__, "cases": cases}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=None, separators=(",", ":"))
    print(f"{len(cases)} cases -> {a.out} ({os.path.getsize(a.out)} bytes)")


if __name__ == "__main__":
    main()
