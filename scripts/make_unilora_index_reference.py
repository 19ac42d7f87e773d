#!/usr/bin/env python3
"""Writes tests/data/unilora_index/reference.txt: numbers drawn with numpy's default_rng, and
PEFT's UniLoRA index assignment (UniLoraModel.generate_index) built on them.

Not part of the test suite: tests/adapters/test_unilora.cpp reads the file and holds
include/peft/core/numpy_generator.hpp and peft::unilora_generate_index to it. One record per
line, integers in decimal:

    raw SEED K v_0 ... v_{K-1}                      default_rng(SEED).bit_generator.random_raw(K)
    choice SEED N SIZE v_0 ... v_{SIZE-1}           default_rng(SEED).choice(N, SIZE, replace=False)
    index COUNT LENGTH SEED K CHECKSUM v_0 ... v_{K-1}
                                                    generate_index(COUNT, LENGTH, SEED): its first K
                                                    entries and sum_i (i + 1) * v[i] mod 2^64

Usage: python3 scripts/make_unilora_index_reference.py [--out tests/data/unilora_index]
"""
import argparse
import os

import numpy as np
import peft
from peft.tuners.unilora.model import UniLoraModel


def checksum(v):
    p = np.asarray(v, dtype=np.uint64)
    w = np.arange(1, len(p) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(p * w, dtype=np.uint64))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "data", "unilora_index"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    lines = [f"# numpy {np.__version__}, peft {peft.__version__}, made by scripts/make_unilora_index_reference.py"]
    seeds = [0, 1, 42, 2025, 2**32 + 5, 2**63 - 1]
    for s in seeds:
        v = np.random.default_rng(s).bit_generator.random_raw(8)
        lines.append(" ".join(str(x) for x in ["raw", s, 8] + [int(x) for x in v]))
    # Floyd's algorithm (n <= 10000 or a small sample) and the tail shuffle (n > 10000, size > n / 50).
    for s, n, size in [(42, 10, 10), (1, 256, 17), (7, 1000, 999), (3, 20000, 100), (9, 20000, 5000), (5, 1, 1)]:
        v = np.random.default_rng(s).choice(n, size, replace=False)
        lines.append(" ".join(str(x) for x in ["choice", s, n, size] + [int(x) for x in v]))
    for count, length, s in [(1216, 200, 42), (1050, 97, 2025), (50, 256, 0), (512, 512, 1), (5000, 20000, 9),
                             (30000, 20000, 3), (100000, 256, 2**32 + 5), (300000, 12345, 2**63 - 1)]:
        v = UniLoraModel.generate_index(count, length, s).numpy()
        k = min(count, 300)
        lines.append(" ".join(str(x) for x in ["index", count, length, s, k, checksum(v)] + [int(x) for x in v[:k]]))
    with open(os.path.join(a.out, "reference.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
