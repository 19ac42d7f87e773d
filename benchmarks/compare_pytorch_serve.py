#!/usr/bin/env python3
"""benchmarks/compare_pytorch_serve.py — HuggingFace PEFT on PyTorch CPU at the shapes of
peft_bench's serve family, for comparison (not part of the build or the tests).

One nn.Linear(4096, 4096) with `adapters` LoRA adapters of rank 16 (random A and B), a batch of m
rows spread round-robin over min(adapters, m) of them, timed as:

  peft_mixed   model(x, adapter_names=[...]): PEFT's mixed-adapter batch (the base layer once,
               then per adapter: gather the rows, lora_B(lora_A(x)) * scaling, scatter)
  peft_loop    one forward per adapter group with set_adapter (what a server without mixed
               batches does)
  torch_dense  the base nn.Linear alone

Usage (torch and peft from PyPI; 2 threads as peft_bench):
    python3 benchmarks/compare_pytorch_serve.py [--threads 2] [--repeats 20] [--peft-bench build/benchmarks/peft_bench]
Prints a Markdown table of median milliseconds per batch; with --peft-bench, runs peft_bench's
serve/{dense,mixed,loop} right after (same machine, same minutes) and adds its figures and the
ratios to the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from peft import LoraConfig, get_peft_model


class One(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = torch.nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--peft-bench", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k = n = 4096
    r = 16
    rows = []
    for m in (8, 64):
        for adapters in (1, 8, 64):
            base = One(k, n).eval()
            cfg = LoraConfig(r=r, lora_alpha=32, target_modules=["proj"], init_lora_weights=False)
            model = get_peft_model(base, cfg, adapter_name="a0")
            for a in range(1, adapters):
                model.add_adapter(f"a{a}", cfg)
            model.eval()
            used = min(adapters, m)
            names = [f"a{i % used}" for i in range(m)]
            x = torch.randn(m, k)
            groups = {}
            for i, name in enumerate(names):
                groups.setdefault(name, []).append(i)

            with torch.inference_mode():
                def mixed():
                    model(x, adapter_names=names)

                def loop():
                    y = torch.empty(m, n)
                    for name, idx in groups.items():
                        model.set_adapter(name)
                        y[idx] = model(x[idx])
                    return y

                def dense():
                    base.proj.base_layer(x) if hasattr(base.proj, "base_layer") else base.proj(x)

                row = (m, adapters, median_ms(dense, args.repeats), median_ms(mixed, args.repeats),
                       median_ms(loop, args.repeats))
            rows.append(row)
            print(f"m={m} adapters={adapters}: dense {row[2]:.2f} ms, PEFT mixed {row[3]:.2f} ms, "
                  f"PEFT loop {row[4]:.2f} ms", flush=True)
    ours = {}
    if args.peft_bench:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run([args.peft_bench, "--benchmark_filter=^serve/(dense|mixed|loop)/",
                              "--benchmark_min_time=0.3", "--benchmark_repetitions=3",
                              "--benchmark_enable_random_interleaving=true",
                              "--benchmark_report_aggregates_only=true", "--benchmark_format=json"],
                             check=True, capture_output=True, text=True, env=env).stdout
        for b in json.loads(out)["benchmarks"]:
            if b.get("aggregate_name") == "median":
                ours[b["run_name"].replace("/real_time", "")] = b["real_time"]  # ms
    print(f"\ntorch {torch.__version__}, {args.threads} threads, k = n = {k}, r = {r}, median ms per batch\n")
    head = "| m | adapters | torch dense | PEFT mixed (adapter_names) | PEFT loop (set_adapter) |"
    if ours:
        head += " peft-cpp dense | peft-cpp mixed | peft-cpp loop | PEFT mixed / peft-cpp mixed |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for m, a, d, mx, lp in rows:
        line = f"| {m} | {a} | {d:.2f} | {mx:.2f} | {lp:.2f} |"
        if ours:
            key = f"m:{m}/k:{k}/n:{n}/r:{r}/adapters:{a}"
            od, om, ol = (ours.get(f"serve/{i}/{key}") for i in ("dense", "mixed", "loop"))
            line += f" {od:.2f} | {om:.2f} | {ol:.2f} | {mx / om:.1f}x |"
        print(line)

if __name__ == "__main__":
    main()
