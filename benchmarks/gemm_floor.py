#!/usr/bin/env python3
"""benchmarks/gemm_floor.py — the time a LoRA training step of a Llama model must spend in the
frozen weights' matrix products alone, with PyTorch's BLAS (torch, MKL in the pip wheel) and with
Debian's OpenBLAS (what peft-cpp's `peft finetune` links): the floor under either side's step time
(not part of the build or tests).

A step over m = batch x seq-len tokens runs, for every frozen linear weight W (out x in, the seven
projections of each block and the untied LM head):
    forward      Y  = X W^T     (m x in) (in x out)    2 m in out flops
    backward     dX = dY W      (m x out) (out x in)   2 m in out flops
(no weight gradient: W is frozen). The first block's q/k/v input gradient is also formed by
peft-cpp but not by PyTorch (nothing before it needs a gradient); it is listed separately.
Attention's score products and the adapters' rank-r products are not counted.

Each distinct product is timed in its own process per library (the two bring different OpenMP
runtimes), --threads threads, the median of --repeats calls after a warm-up, then multiplied by
how many times a step makes it. With --results (the --json of compare_pytorch_llm.py) the report
also gives the floor as a share of each side's measured LoRA step.

Usage:
    python3 benchmarks/gemm_floor.py [--shapes bench-33m,bench-100m] [--threads 2] [--batch 4]
        [--seq-len 128] [--repeats 15] [--openblas /lib/x86_64-linux-gnu/libopenblas.so.0]
        [--results results.json] [--json OUT.json]
Needs torch for the PyTorch side and numpy; the parent process imports neither.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))


def products(shape, m):
    """[(label, m, k, n, transpose_b, count)] of one training step; C(m x n) = A(m x k) B or B^T."""
    from make_random_llama import SHAPES  # numpy only at call time in the workers' parent
    s = SHAPES[shape]
    h, f, v, layers = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    hd = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd
    linears = [("q", h, h), ("k", h, kv), ("v", h, kv), ("o", h, h), ("gate", h, f), ("up", h, f), ("down", f, h)]
    out = []
    for name, fan_in, fan_out in linears:
        out.append((f"{name} forward", m, fan_in, fan_out, True, layers))
        grads = layers - 1 if name in ("q", "k", "v") else layers
        out.append((f"{name} input gradient", m, fan_out, fan_in, False, grads))
    out.append(("lm_head forward", m, h, v, True, 1))
    out.append(("lm_head input gradient", m, v, h, False, 1))
    extra = [(f"{n} input gradient, first block", m, o, i, False, 1) for n, i, o in linears[:3]]
    return out, extra


def worker(lib, spec):
    """Times spec's products with `lib` (torch or openblas); prints {key: seconds} as JSON."""
    import time
    import numpy as np
    threads, repeats = spec["threads"], spec["repeats"]
    rng = np.random.default_rng(0)
    result = {}
    if lib == "torch":
        import torch
        torch.set_num_threads(threads)
        for m, k, n, tb in spec["shapes"]:
            a = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
            # F.linear's weight is (n x k): the forward product; the backward one is A @ B (k x n).
            b = torch.from_numpy(rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32))
            op = (lambda: torch.nn.functional.linear(a, b)) if tb else (lambda: torch.mm(a, b))
            op()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                op()
                times.append(time.perf_counter() - t0)
            result[f"{m},{k},{n},{int(tb)}"] = float(np.median(times))
    else:
        import ctypes
        blas = ctypes.CDLL(spec["openblas"])
        blas.openblas_set_num_threads(ctypes.c_int(threads))
        f = ctypes.c_float
        p = ctypes.POINTER(ctypes.c_float)
        blas.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [f, p, ctypes.c_int, p, ctypes.c_int, f, p, ctypes.c_int]
        row_major, no_trans, trans = 101, 111, 112
        for m, k, n, tb in spec["shapes"]:
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
            c = np.empty((m, n), dtype=np.float32)
            args = (row_major, no_trans, trans if tb else no_trans, m, n, k, f(1.0), a.ctypes.data_as(p), k,
                    b.ctypes.data_as(p), k if tb else n, f(0.0), c.ctypes.data_as(p), n)
            blas.cblas_sgemm(*args)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                blas.cblas_sgemm(*args)
                times.append(time.perf_counter() - t0)
            result[f"{m},{k},{n},{int(tb)}"] = float(np.median(times))
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="bench-33m,bench-100m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--openblas", default="/lib/x86_64-linux-gnu/libopenblas.so.0")
    ap.add_argument("--results", help="compare_pytorch_llm.py's --json: the measured LoRA steps")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--worker", choices=["torch", "openblas"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, json.loads(a.spec))
        return
    m = a.batch * a.seq_len
    measured = {}
    if a.results:
        with open(a.results) as fh:
            for shape, r in json.load(fh).get("shapes", {}).items():
                try:
                    lora = r["runs"]["lora"]
                    measured[shape] = {"torch": lora["pytorch"]["ms_per_step"], "peft-cpp": lora["peft_cpp"]["ms_per_step"]}
                except (KeyError, TypeError):
                    pass
    report, numbers = [], {}
    for shape in a.shapes.split(","):
        main_list, extra = products(shape, m)
        distinct = sorted({(mm, k, n, tb) for _, mm, k, n, tb, _ in main_list + extra})
        spec = json.dumps({"threads": a.threads, "repeats": a.repeats, "openblas": a.openblas, "shapes": distinct})
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads))
        times = {}
        for lib in ("torch", "openblas"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", lib, "--spec", spec],
                                 env=env, check=True, capture_output=True, text=True).stdout
            times[lib] = json.loads(out.strip().splitlines()[-1])
        rows, total = [], {"torch": 0.0, "openblas": 0.0}
        flops = 0.0
        for label, mm, k, n, tb, count in main_list:
            key = f"{mm},{k},{n},{int(tb)}"
            flops += 2.0 * mm * k * n * count
            for lib in total:
                total[lib] += times[lib][key] * count
            rows.append((label, f"{mm}x{k} . {k}x{n}", count, times["torch"][key] * 1e3, times["openblas"][key] * 1e3))
        extra_ms = {lib: sum(times[lib][f"{mm},{k},{n},{int(tb)}"] for _, mm, k, n, tb, _ in extra) * 1e3 for lib in total}
        numbers[shape] = {"gflop": flops / 1e9, "floor_ms": {lib: t * 1e3 for lib, t in total.items()},
                          "first_block_qkv_input_gradient_ms": extra_ms, "products": rows}
        report.append(f"### {shape}: frozen weights' products of one LoRA step (m = {m} tokens, {a.threads} threads)\n")
        report.append("| product | shape | per step | torch.mm ms | OpenBLAS ms |")
        report.append("|---|---|---:|---:|---:|")
        for label, sh, count, tt, to in rows:
            report.append(f"| {label} | {sh} | {count} | {tt:.2f} | {to:.2f} |")
        gf = flops / 1e9
        report.append(f"| **sum** | {gf:.1f} GFLOP | | **{total['torch'] * 1e3:.0f}** ({gf / total['torch']:.0f} GFLOP/s) "
                      f"| **{total['openblas'] * 1e3:.0f}** ({gf / total['openblas']:.0f} GFLOP/s) |")
        report.append(f"\nThe first block's q/k/v input gradient (peft-cpp forms it, PyTorch does not): "
                      f"{extra_ms['openblas']:.1f} ms with OpenBLAS.")
        if shape in measured:
            t, c = measured[shape]["torch"], measured[shape]["peft-cpp"]
            report.append(f"Measured LoRA steps (--results): PyTorch {t:.0f} ms, of which its products' floor is "
                          f"{total['torch'] * 1e3 / t:.0%}; peft-cpp {c:.0f} ms, of which OpenBLAS's floor is "
                          f"{total['openblas'] * 1e3 / c:.0%}. A step at 0.67x PyTorch's ({0.67 * t:.0f} ms) leaves "
                          f"{0.67 * t - total['openblas'] * 1e3:.0f} ms beside OpenBLAS's products.")
        report.append("")
    print("\n".join(report))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(numbers, fh, indent=1)


if __name__ == "__main__":
    main()
