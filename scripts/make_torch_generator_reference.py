#!/usr/bin/env python3
"""Writes tests/data/torch_generator/reference.txt: numbers drawn with PyTorch's CPU generator.

Not part of the test suite: tests/core/test_torch_generator.cpp reads the file and holds
include/peft/core/torch_generator.hpp to it. One record per line, integers in decimal:

    randperm SEED N K CHECKSUM v_0 ... v_{K-1}   torch.randperm(N, generator=manual_seed(SEED)):
                                                 its first K entries and sum_i (i + 1) * perm[i]
                                                 mod 2^64 over all N entries
    random64 SEED K v_0 ... v_{K-1}              torch.randint(0, 2**62, (K,)): random64() % 2^62

(randperm below 2^32/20 exercises the 32-bit draws: randint does not, it takes 64 bits.)
SEED is written as the uint64 torch keeps (a negative seed wraps). --large adds one permutation
above randperm's 2^32/20 switch to 64-bit draws (1.7 GB while it runs).

Usage: python3 scripts/make_torch_generator_reference.py [--large] [--out tests/data/torch_generator]
"""
import argparse
import os

import numpy as np
import torch


def checksum(perm):
    p = perm.numpy().astype(np.uint64)
    w = np.arange(1, len(p) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(p * w, dtype=np.uint64))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "data", "torch_generator"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    lines = [f"# torch {torch.__version__}, made by scripts/make_torch_generator_reference.py"]
    seeds = [0, 1, 777, 2024, 2**32 + 777, -1]
    sizes = [1, 2, 3, 10, 100, 1000, 4608, 6144, 65536, 1_000_003, 4096 * 4096]
    for seed in seeds:
        for n in sizes:
            if n > 100_000 and seed not in (777, -1):
                continue
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(n, generator=g)
            k = min(n, 400)
            lines.append(" ".join(str(v) for v in
                                  ["randperm", g.initial_seed(), n, k, checksum(perm)] + perm[:k].tolist()))
        g = torch.Generator().manual_seed(seed)
        v = torch.randint(0, 2**62, (64,), generator=g)
        lines.append(" ".join(str(x) for x in ["random64", g.initial_seed(), 64] + v.tolist()))
    if a.large:
        n = (2**32 - 1) // 20  # the first size that takes the 64-bit path
        g = torch.Generator().manual_seed(5)
        perm = torch.randperm(n, generator=g)
        lines.append(" ".join(str(v) for v in ["randperm", g.initial_seed(), n, 100, checksum(perm)] +
                              perm[:100].tolist()))
        del perm
    with open(os.path.join(a.out, "reference.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
