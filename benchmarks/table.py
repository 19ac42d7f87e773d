#!/usr/bin/env python3
"""benchmarks/table.py RESULTS.csv — the Markdown tables of benchmarks/RESULTS.md from one
peft_bench run written with --benchmark_out=RESULTS.csv --benchmark_out_format=csv: median
times (the single measurement when the run has no repetitions) and the ratios the kernels issue
sets targets for, all within the same run."""
import csv
import sys


def load(path):
    rows = {}
    with open(path, newline="") as f:
        lines = f.readlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("name,"))
    for r in csv.DictReader(lines[start:]):
        name = r["name"]
        if r.get("error_occurred") == "true":
            continue
        agg = None
        for suffix in ("_median", "_mean", "_stddev", "_cv"):
            if name.endswith(suffix):
                agg = suffix[1:]
                name = name[: -len(suffix)]
        if agg not in (None, "median"):
            continue
        if agg is None and name in rows:
            continue  # keep the median when repetitions were reported
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[r["time_unit"]]
        name = name.replace("/real_time", "").replace("/manual_time", "")
        rows[name] = float(r["real_time"]) * scale
    return rows


def main():
    t = load(sys.argv[1])
    ms = [1, 8, 64, 512]

    def get(impl, m, r=16, family="linear"):
        return t.get(f"{family}/{impl}/m:{m}/k:4096/n:4096/r:{r}")

    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}g}"

    def ratio(a, b):
        return None if a is None or b is None else a / b

    if any(k.startswith("linear/") for k in t):
        linear_tables(t, get, fmt, ratio, ms)
    if any(k.startswith("serve/") for k in t):
        serve_tables(t, fmt, ratio)


def linear_tables(t, get, fmt, ratio, ms):
    impls = ["eigen_dense", "openblas_dense", "lora_naive", "dense_f32", "lora_f32", "dora_f32",
             "dense_int8", "lora_int8", "dense_q4_0", "lora_q4_0", "dense_nf4", "lora_nf4"]
    print("Median ms per call, k = n = 4096, r = 16:\n")
    print("| impl | " + " | ".join(f"m = {m}" for m in ms) + " |")
    print("|---|" + "---|" * len(ms))
    for impl in impls:
        print(f"| linear/{impl} | " + " | ".join(fmt(get(impl, m)) for m in ms) + " |")
    for r in (4, 64):
        print(f"| linear/lora_f32 r = {r} | " + " | ".join(fmt(get('lora_f32', m, r)) for m in ms) + " |")
    for impl in ["full_f32", "lora_f32", "dora_f32", "lora_q4_0"]:
        print(f"| train_step/{impl} | " + " | ".join(fmt(get(impl, m, family='train_step')) for m in ms) + " |")

    print("\nRatios (same run; target in brackets):\n")
    print("| ratio | " + " | ".join(f"m = {m}" for m in ms) + " |")
    print("|---|" + "---|" * len(ms))
    rows = [
        ("lora_f32 / dense_f32 [<= 1.03]", lambda m: ratio(get("lora_f32", m), get("dense_f32", m))),
        ("lora_f32 / eigen_dense [<= 1.0]", lambda m: ratio(get("lora_f32", m), get("eigen_dense", m))),
        ("lora_naive / eigen_dense", lambda m: ratio(get("lora_naive", m), get("eigen_dense", m))),
        ("dense_f32 / eigen_dense [<= 0.25 at m = 8]", lambda m: ratio(get("dense_f32", m), get("eigen_dense", m))),
        ("dense_f32 / openblas_dense [<= 1.05 m=1, 0.9 m=64, 1.05 m=512]",
         lambda m: ratio(get("dense_f32", m), get("openblas_dense", m))),
        ("dora_f32 / lora_f32 [<= 1.05]", lambda m: ratio(get("dora_f32", m), get("lora_f32", m))),
        ("lora_int8 / eigen_dense [bytes: 0.25]", lambda m: ratio(get("lora_int8", m), get("eigen_dense", m))),
        ("lora_q4_0 / eigen_dense [<= 0.125 at m = 1]", lambda m: ratio(get("lora_q4_0", m), get("eigen_dense", m))),
        ("lora_nf4 / eigen_dense [bytes: 0.13]", lambda m: ratio(get("lora_nf4", m), get("eigen_dense", m))),
        ("lora_q4_0 / dense_q4_0", lambda m: ratio(get("lora_q4_0", m), get("dense_q4_0", m))),
        ("train_step dora / lora [<= 1.5 at m = 64]",
         lambda m: ratio(get("dora_f32", m, family="train_step"), get("lora_f32", m, family="train_step"))),
        ("train_step lora / full", lambda m: ratio(get("lora_f32", m, family="train_step"),
                                                   get("full_f32", m, family="train_step"))),
    ]
    for label, f in rows:
        print(f"| {label} | " + " | ".join(fmt(f(m), 3) for m in ms) + " |")

    merge = t.get("switch/lora_merge/k:4096/n:4096/r:16")
    shira = t.get("switch/shira/k:4096/n:4096/r:16")
    print("\n| switch (k = n = 4096, r = 16) | ms |")
    print("|---|---|")
    print(f"| switch/lora_merge (merge + unmerge) | {fmt(merge)} |")
    print(f"| switch/shira (apply + remove) | {fmt(shira)} |")
    print(f"| lora_merge / shira [>= 20] | {fmt(ratio(merge, shira))} |")



def serve_tables(t, fmt, ratio):
    def get(impl, m, a):
        return t.get(f"serve/{impl}/m:{m}/k:4096/n:4096/r:16/adapters:{a}")

    cols = [(m, a) for m in (8, 64) for a in (1, 8, 64)]
    print("\nServing, k = n = 4096, r = 16, median ms per batch of m rows over `adapters` adapters:\n")
    print("| impl | " + " | ".join(f"m = {m}, {a}" for m, a in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for impl in ["dense", "single", "mixed", "loop", "gather_scatter"]:
        print(f"| serve/{impl} | " + " | ".join(fmt(get(impl, m, a)) for m, a in cols) + " |")
    print("\n| ratio (throughput) | " + " | ".join(f"m = {m}, {a}" for m, a in cols) + " |")
    print("|---|" + "---|" * len(cols))
    rows = [
        ("mixed / single [>= 0.8 at m = 64, 8]", lambda m, a: ratio(get("single", m, a), get("mixed", m, a))),
        ("mixed / loop [>= 2 at 64 adapters]", lambda m, a: ratio(get("loop", m, a), get("mixed", m, a))),
        ("mixed / gather_scatter", lambda m, a: ratio(get("gather_scatter", m, a), get("mixed", m, a))),
        ("mixed / dense", lambda m, a: ratio(get("dense", m, a), get("mixed", m, a))),
    ]
    for label, f in rows:
        print(f"| {label} | " + " | ".join(fmt(f(m, a), 3) for m, a in cols) + " |")
    print("\n| fused switching (k = n = 4096, r = 16) | ms |")
    print("|---|---|")
    for impl in ["fuse_lora", "unfuse_lora", "fuse_shira", "unfuse_shira"]:
        print(f"| serve/{impl} | {fmt(t.get(f'serve/{impl}/k:4096/n:4096/r:16'))} |")
    lora = ratio(t.get("serve/fuse_lora/k:4096/n:4096/r:16"), t.get("serve/fuse_shira/k:4096/n:4096/r:16"))
    print(f"| fuse_lora / fuse_shira | {fmt(lora)} |")


if __name__ == "__main__":
    main()
