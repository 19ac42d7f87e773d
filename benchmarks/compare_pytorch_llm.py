#!/usr/bin/env python3
"""benchmarks/compare_pytorch_llm.py — LoRA fine-tuning of a Llama model on the CPU, peft-cpp's
`peft finetune` against HuggingFace PEFT on PyTorch: the same model file, the same token batches in
the same order, the same threads, batch and optimizer, in one run (not part of the build or tests).

For each shape (scripts/make_random_llama.py: bench-33m, bench-100m, small, tinyllama-1.1b) it
  1. makes the model directory (random bf16 weights, cached under --work) and a file of random
     token ids (seeded): steps x batch lines of --seq-len ids;
  2. runs `peft finetune` for LoRA (r 16, alpha 32, all-linear), DoRA and QLoRA (--quantize-base
     nf4 and q4_0), each in its own process, its peak RSS from wait4's rusage;
  3. runs HuggingFace PEFT in a fresh Python process per method (this script with --torch-worker):
     transformers' AutoModelForCausalLM in float32, LoraConfig(r, alpha, "all-linear", dropout 0,
     use_dora for DoRA), torch.optim.AdamW (betas .9/.999, eps 1e-8, weight decay 0, constant lr),
     labels = input_ids, each step (batch, forward, backward, optimizer step, zero_grad) timed
     with perf_counter; QLoRA through bitsandbytes' 4-bit NF4 (compute dtype float32), or "not
     run" with the exception's text when bitsandbytes is absent or fails on the CPU;
  4. times greedy generation (16-token prompt, 64 new tokens, end-of-sequence ignored):
     `peft generate` with the LoRA adapter of step 2 (unmerged) and the base model alone (what a
     merged model costs); PyTorch's model.generate with the unmerged PEFT model and after
     merge_and_unload. Decoding tokens/s (the prompt's pass excluded) on both sides, the median
     of --gen-repeats after one warm-up;
  5. prints a Markdown report per shape (step time, tokens/s, peak RSS, their ratios, the
     targets met or missed, step-0 losses of both) and writes the raw numbers with --json.

The first --warmup steps (default 2) are excluded from the step time: peft-cpp's from the
differences of its log's cumulative seconds column, PyTorch's from its own per-step times.
Step-0 losses must agree (LoRA's B starts at zero, so they are the base model's loss on the same
batch): the report shows both and their relative difference (checked against --loss-rtol for
LoRA and DoRA; QLoRA's differ by the two quantizers).

With --repeats K every fine-tuning run is made K times, peft-cpp and PyTorch alternated; the
report takes the run whose mean step time is the median and lists all K (on a shared virtual
machine a whole process sometimes runs 30% slower than the next, the same binary on the same
input: one run per side can land in such a spell). peft-cpp's generation runs K processes per
side too, unmerged and base alternated, and reports each side's median process (PyTorch's
generation is timed once, inside its first LoRA run). --methods picks runs by key.

Before each run the script watches /proc/stat for 1 s and warns (in the log and the report) when
other processes keep more than 10% of the CPUs busy: with every core in use, threads that wait for
each other get descheduled and both sides' times become meaningless.

Usage (measurements run one after another; nothing else should load the machine meanwhile):
    python3 benchmarks/compare_pytorch_llm.py [--peft build/examples/peft]
        [--shapes bench-33m,bench-100m] [--steps 10] [--warmup 2] [--threads 2] [--batch 4]
        [--seq-len 128] [--lr 1e-4] [--rank 16] [--alpha 32] [--work /tmp/peft_compare]
        [--json OUT.json] [--skip-qlora] [--skip-generate] [--gen-repeats 3]
        [--methods lora,dora,qlora_nf4,qlora_q4_0] [--repeats K]
    e.g. a quick check:  python3 benchmarks/compare_pytorch_llm.py --shapes small --steps 3
The tool of a Release build without PEFT_QUICK_DEMOS (scripts/setup.sh test turns it on, which
compiles the tool at -O1; scripts/setup.sh bench turns it off again):
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPEFT_QUICK_DEMOS=OFF && cmake --build build --target peft_cli

Needs numpy (the model maker) and, for the PyTorch side, torch, transformers and peft
(bitsandbytes for PyTorch QLoRA); the parent process imports none of them.
"""
import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAKE_MODEL = ROOT / "scripts" / "make_random_llama.py"

# Targets of the issue (peft-cpp against PyTorch + PEFT).
TARGET_STEP_RATIO = 0.67  # peft-cpp ms/step / PyTorch ms/step (LoRA), at most
TARGET_RSS_RATIO = 0.5  # peft-cpp peak RSS / PyTorch peak RSS (LoRA), at most
TARGET_DORA_CPP = 1.3  # peft-cpp DoRA / LoRA step time, at most
PYTORCH_DORA_EXPECTED = 2.0  # PyTorch DoRA / LoRA step time, about (reference, not a target)
TARGET_GEN_RATIO = 0.95  # peft-cpp decoding tokens/s unmerged / merged (base), at least

BUSY_WARN = 0.1  # warn when other processes keep more than this fraction of the CPUs busy

METHODS = [  # (key, label, peft-cpp method, --quantize-base, PyTorch variant or None)
    ("lora", "LoRA", "lora", None, "lora"),
    ("dora", "DoRA", "dora", None, "dora"),
    ("qlora_nf4", "QLoRA nf4", "lora", "nf4", "nf4"),
    ("qlora_q4_0", "QLoRA q4_0", "lora", "q4_0", None),  # bitsandbytes has no Q4_0
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- machine --------------------------------------------------------------------------------------

def cpu_info():
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or "?", flags


def peft_cpp_isa(flags):
    """The kernels peft-cpp runs (include/peft/kernels/isa.hpp: the best the CPU supports, capped
    by PEFT_ISA)."""
    order = ["reference", "portable", "avx2", "avx512"]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        best = "avx512"
    elif {"avx2", "fma"} <= flags:
        best = "avx2"
    else:
        best = "portable"
    cap = os.environ.get("PEFT_ISA", "")
    if cap in order and order.index(cap) < order.index(best):
        best = cap
    return {"avx512": "AVX-512", "avx2": "AVX2", "portable": "portable", "reference": "reference"}[best] + (
        f" (PEFT_ISA={cap})" if cap else "")


def cpu_busy(seconds=1.0):
    """The fraction of all CPUs busy over `seconds` (/proc/stat), while this script waits: what other
    processes take. None where /proc/stat is unreadable."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    try:
        i0, t0 = read()
        time.sleep(seconds)
        i1, t1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (i1 - i0) / (t1 - t0) if t1 > t0 else None


BUSY_SAMPLES = []


def sample_busy(when):
    b = cpu_busy()
    BUSY_SAMPLES.append({"when": when, "busy": b})
    if b is not None and b > BUSY_WARN:
        log(f"warning: {when}: other processes kept {100 * b:.0f}% of the CPUs busy; the times will not be "
            "representative")


def versions():
    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    return v


# ---- processes ----------------------------------------------------------------------------------

def thread_env(threads):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def run_measured(cmd, env, out_dir, name):
    """Runs cmd to completion; stdout and stderr go to files. Returns rc, wall seconds, the
    child's peak RSS (wait4's ru_maxrss, KiB on Linux) and both outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sample_busy(f"before {out_dir.parent.name}/{name}")
    so, se = out_dir / f"{name}.stdout", out_dir / f"{name}.stderr"
    t0 = time.perf_counter()
    with open(so, "wb") as fo, open(se, "wb") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"cmd": [str(c) for c in cmd], "rc": p.returncode, "wall_s": wall, "peak_rss_kib": ru.ru_maxrss,
            "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "stdout": so.read_text(errors="replace"), "stderr": se.read_text(errors="replace")}


def tail(text, n=6):
    lines = [l for l in text.replace("\r", "\n").splitlines() if l.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


# ---- inputs -------------------------------------------------------------------------------------

def model_vocab(model_dir):
    with open(model_dir / "config.json") as f:
        return json.load(f)


def ensure_model(work, shape, seed):
    d = work / f"model-{shape}-seed{seed}"
    if not (d / "model.safetensors").exists() or not (d / "config.json").exists():
        log(f"making {d}")
        subprocess.run([sys.executable, str(MAKE_MODEL), str(d), "--shape", shape, "--seed", str(seed)], check=True)
    return d


def write_ids(path, rows):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(" ".join(map(str, r)) + "\n")
    os.replace(tmp, path)


def ensure_tokens(work, vocab, lines, seq_len, seed):
    path = work / f"tokens-v{vocab}-n{lines}-l{seq_len}-seed{seed}.txt"
    if not path.exists():
        rng = random.Random(seed)
        write_ids(path, [[rng.randrange(vocab) for _ in range(seq_len)] for _ in range(lines)])
    return path


def ensure_prompt(work, vocab, prompt_len, copies, seed):
    """One random prompt, repeated `copies` times (peft generate times each line)."""
    path = work / f"prompt-v{vocab}-l{prompt_len}-x{copies}-seed{seed}.txt"
    if not path.exists():
        rng = random.Random(seed + 7919)
        p = [rng.randrange(3, vocab) for _ in range(prompt_len)]  # ids 0-2: unk, bos, eos
        write_ids(path, [p] * copies)
    return path


def safetensors_params(path):
    """Number of values in a .safetensors file (its header's shapes)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


# ---- peft-cpp -----------------------------------------------------------------------------------

def step_stats(times_s, warmup, tokens_per_step):
    measured = times_s[warmup:]
    if not measured:
        return {}
    mean = statistics.fmean(measured)
    return {"ms_per_step": 1e3 * mean, "median_ms_per_step": 1e3 * statistics.median(measured),
            "min_ms_per_step": 1e3 * min(measured), "max_ms_per_step": 1e3 * max(measured),
            "tokens_per_s": tokens_per_step / mean if mean > 0 else None, "measured_steps": len(measured)}


def cpp_finetune(a, shape_dir, model_dir, tokens, key, method, quant, env):
    out = shape_dir / f"cpp-{key}"
    if out.exists():
        shutil.rmtree(out)
    log_csv = shape_dir / f"cpp-{key}.log.csv"
    cmd = [a.peft, "finetune", "--model", model_dir, "--tokens", tokens, "--method", method, "--rank", str(a.rank),
           "--alpha", str(a.alpha), "--targets", "all-linear", "--steps", str(a.steps), "--batch", str(a.batch),
           "--lr", repr(a.lr), "--threads", str(a.threads), "--seed", str(a.seed), "--log", log_csv, "--out", out]
    if quant:
        cmd += ["--quantize-base", quant]
    log(f"peft-cpp {key}: {shlex.join(map(str, cmd))}")
    r = run_measured(cmd, env, shape_dir / "logs", f"cpp-{key}")
    rec = {k: r[k] for k in ("cmd", "rc", "wall_s", "peak_rss_kib", "user_s", "sys_s")}
    if r["rc"] != 0:
        rec["status"] = f"failed (exit {r['rc']}): {tail(r['stderr'])}"
        log(rec["status"])
        return rec, None
    rows = []
    with open(log_csv) as f:
        head = f.readline().strip().split(",")
        for line in f:
            if line.strip():
                d = dict(zip(head, line.strip().split(",")))
                rows.append({"step": int(d["step"]), "loss": float(d["loss"]), "seconds": float(d["seconds"])})
    secs = [x["seconds"] for x in rows]
    times = [secs[0]] + [secs[i] - secs[i - 1] for i in range(1, len(secs))]
    rec.update(status="ok", losses=[x["loss"] for x in rows], step_times_s=times,
               **step_stats(times, a.warmup, a.batch * a.seq_len))
    m = re.search(r"(\d+) trainable parameters", r["stderr"])
    if m:
        rec["trainable_params"] = int(m.group(1))
    elif (out / "adapter_model.safetensors").exists():
        rec["trainable_params"] = safetensors_params(out / "adapter_model.safetensors")
    log(f"peft-cpp {key}: {rec.get('ms_per_step', float('nan')):.1f} ms/step, peak RSS "
        f"{rec['peak_rss_kib'] / 1024:.0f} MiB, step-0 loss {rec['losses'][0]:.6f}")
    return rec, out


def cpp_generate(a, shape_dir, model_dir, prompt, adapter, name, env):
    cmd = [a.peft, "generate", "--model", model_dir, "--tokens", prompt, "--max-new-tokens", str(a.max_new_tokens),
           "--ignore-eos", "--timings", "--threads", str(a.threads)]
    if adapter:
        cmd += ["--adapter", adapter]
    log(f"peft-cpp {name}: {shlex.join(map(str, cmd))}")
    r = run_measured(cmd, env, shape_dir / "logs", f"cpp-{name}")
    rec = {k: r[k] for k in ("cmd", "rc", "wall_s", "peak_rss_kib")}
    if r["rc"] != 0:
        rec["status"] = f"failed (exit {r['rc']}): {tail(r['stderr'])}"
        log(rec["status"])
        return rec
    pat = re.compile(r"prompt (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\), (\d+) decoding steps in ([\d.]+) s "
                     r"\(([\d.]+) tokens/s\)")
    runs = [{"prompt_tokens": int(m[1]), "prompt_s": float(m[2]), "decode_steps": int(m[4]),
             "decode_s": float(m[5]), "decode_tokens_per_s": float(m[6])} for m in pat.finditer(r["stderr"])]
    timed = runs[1:] if len(runs) > 1 else runs  # the first prompt is the warm-up
    if not timed:
        rec["status"] = f"no --timings line in: {tail(r['stderr'])}"
        return rec
    rec.update(status="ok", runs=runs, tokens=r["stdout"].split("\n")[0].split(),
               decode_tokens_per_s=statistics.median(x["decode_tokens_per_s"] for x in timed))
    log(f"peft-cpp {name}: {rec['decode_tokens_per_s']:.1f} tokens/s decoding")
    return rec


# ---- PyTorch + PEFT (in a process of its own) -------------------------------------------------

def torch_run(a, shape_dir, model_dir, tokens, prompt, key, variant, generate, env):
    spec = {"model": str(model_dir), "tokens": str(tokens), "prompt": str(prompt) if prompt else None,
            "variant": variant, "steps": a.steps, "warmup": a.warmup, "batch": a.batch, "lr": a.lr,
            "rank": a.rank, "alpha": a.alpha, "threads": a.threads, "seed": a.seed, "generate": generate,
            "max_new_tokens": a.max_new_tokens, "gen_repeats": a.gen_repeats,
            "result": str(shape_dir / f"torch-{key}.json")}
    spec_path = shape_dir / f"torch-{key}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    res_path = Path(spec["result"])
    if res_path.exists():
        res_path.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-worker", str(spec_path)]
    log(f"PyTorch {key}: {shlex.join(cmd)}")
    r = run_measured(cmd, env, shape_dir / "logs", f"torch-{key}")
    if res_path.exists():
        rec = json.loads(res_path.read_text())
    else:
        rec = {"status": f"failed (exit {r['rc']}): {tail(r['stderr'])}"}
    rec.update(cmd=r["cmd"], rc=r["rc"], wall_s=r["wall_s"], peak_rss_kib_wait4=r["peak_rss_kib"])
    if rec.get("status") == "ok":
        rec.update(step_stats(rec["step_times_s"], a.warmup, a.batch * a.seq_len))
        log(f"PyTorch {key}: {rec['ms_per_step']:.1f} ms/step, peak RSS {rec['peak_rss_kib'] / 1024:.0f} MiB, "
            f"step-0 loss {rec['losses'][0]:.6f}")
    else:
        if r["rc"] != 0 and "exit" not in rec["status"]:
            rec["status"] += f" (exit {r['rc']}: {tail(r['stderr'], 3)})"
        log(f"PyTorch {key}: {rec['status']}")
    return rec


def torch_worker(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    out = {"status": "failed"}

    def save():
        Path(spec["result"]).write_text(json.dumps(out, indent=1))

    import resource

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    try:
        import torch
        torch.set_num_threads(spec["threads"])
        torch.set_num_interop_threads(1)
        import transformers
        import peft
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        out.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                   num_threads=torch.get_num_threads(), num_interop_threads=torch.get_num_interop_threads(),
                   rss_after_imports_kib=rss())
        torch.manual_seed(spec["seed"])
        kw = {}
        if spec["variant"] == "nf4":
            try:
                import bitsandbytes
                from transformers import BitsAndBytesConfig
                out["bitsandbytes"] = bitsandbytes.__version__
                kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_compute_dtype=torch.float32),
                          device_map="cpu")
                model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, **kw)
            except Exception as e:  # bitsandbytes absent, or no CPU path
                out["status"] = f"not run: {type(e).__name__}: {e}"
                save()
                return
        else:
            model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        out["rss_after_load_kib"] = rss()
        cfg = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules="all-linear", lora_dropout=0.0,
                         use_dora=spec["variant"] == "dora", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        out["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        with open(spec["tokens"]) as f:
            rows = [list(map(int, line.split())) for line in f if line.strip()]
        n, B = len(rows), spec["batch"]
        model.train()
        losses, times = [], []
        try:
            for s in range(spec["steps"]):
                t0 = time.perf_counter()
                ids = torch.tensor([rows[(s * B + i) % n] for i in range(B)], dtype=torch.long)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                lv = loss.item()
                times.append(time.perf_counter() - t0)
                losses.append(lv)
                print(f"step {s}: loss {lv:.6f}, {1e3 * times[-1]:.1f} ms", file=sys.stderr, flush=True)
        except Exception as e:
            if spec["variant"] == "nf4":  # bitsandbytes' CPU path failing in training
                out["status"] = f"not run: {type(e).__name__}: {e}"
                save()
                return
            raise
        out.update(losses=losses, step_times_s=times, peak_rss_kib=rss(), status="ok")
        save()
        if spec["generate"]:
            try:
                out["generation"] = dict(torch_generate(model, spec), status="ok")
            except Exception as e:
                import traceback
                out["generation"] = {"status": f"failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            out["peak_rss_kib_after_generation"] = rss()
            save()
    except BaseException as e:
        import traceback
        out["status"] = f"failed: {type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
        save()
        raise


def torch_generate(model, spec):
    import torch

    class Stamps:  # a streamer: put() gets the prompt, then each new token
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    with open(spec["prompt"]) as f:
        prompt = torch.tensor([list(map(int, f.readline().split()))], dtype=torch.long)
    N = spec["max_new_tokens"]

    def timed(m):
        m.eval()
        kw = dict(do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
        with torch.no_grad():
            m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **dict(kw, max_new_tokens=4,
                                                                                         min_new_tokens=4))
            runs, toks = [], None
            for _ in range(spec["gen_repeats"]):
                st = Stamps()
                t0 = time.perf_counter()
                ids = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), streamer=st, **kw)
                t1 = time.perf_counter()
                new = ids[0, prompt.shape[1]:].tolist()
                toks = new
                # st.t[0]: the prompt (before its pass); st.t[1]: the first new token (after it).
                steps = len(st.t) - 2
                runs.append({"new_tokens": len(new), "total_s": t1 - t0, "prompt_s": st.t[1] - st.t[0],
                             "decode_steps": steps, "decode_s": st.t[-1] - st.t[1],
                             "decode_tokens_per_s": steps / (st.t[-1] - st.t[1])})
        return {"runs": runs, "tokens": toks,
                "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs)}

    res = {"unmerged": timed(model)}
    merged = model.merge_and_unload()
    res["merged"] = timed(merged)
    res["same_tokens"] = res["unmerged"]["tokens"] == res["merged"]["tokens"]
    return res


# ---- report -------------------------------------------------------------------------------------

def fmt(x, spec=".1f", none="—"):
    return none if x is None else format(x, spec)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def verdict(value, target, at_most=True):
    if value is None:
        return "n/a"
    ok = value <= target if at_most else value >= target
    return "met" if ok else "**missed**"


def mib(kib):
    return None if kib is None else kib / 1024


def shape_report(a, shape, res):
    cfg = res["config"]
    out = []
    out.append(f"### {shape}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, intermediate "
               f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']} ({res['params'] / 1e6:.1f} M parameters)\n")
    out.append(f"Batch {a.batch} x {a.seq_len} tokens, {a.threads} threads, {a.steps} steps (first {a.warmup} "
               f"excluded from ms/step), rank {a.rank}, alpha {a.alpha}, all-linear, AdamW lr {a.lr:g}.\n")
    out.append("| run | peft-cpp ms/step | PyTorch ms/step | peft-cpp / PyTorch | peft-cpp tokens/s | PyTorch tokens/s "
               "| peft-cpp peak RSS MiB | PyTorch peak RSS MiB | RSS peft-cpp / PyTorch | trainable params (cpp / PyTorch) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for key, label, *_ in METHODS:
        if key not in res["runs"]:
            continue
        c, t = res["runs"][key]["peft_cpp"], res["runs"][key]["pytorch"]
        c_ok, t_ok = c.get("status") == "ok", t is not None and t.get("status") == "ok"
        cm = c.get("ms_per_step") if c_ok else None
        tm = t.get("ms_per_step") if t_ok else None
        cr = mib(c.get("peak_rss_kib")) if c_ok else None
        tr = mib(t.get("peak_rss_kib")) if t_ok else None
        sr, rr = ratio(cm, tm), ratio(cr, tr)
        if key == "lora":
            sr_s = f"{fmt(sr, '.2f')} ({verdict(sr, TARGET_STEP_RATIO)})" if sr is not None else "—"
            rr_s = f"{fmt(rr, '.2f')} ({verdict(rr, TARGET_RSS_RATIO)})" if rr is not None else "—"
        else:
            sr_s, rr_s = fmt(sr, ".2f"), fmt(rr, ".2f")
        if not c_ok:
            notes.append(f"peft-cpp {label}: {c.get('status')}")
        if t is None:
            t_cell = "— (bitsandbytes has no Q4_0)"
        elif not t_ok:
            t_cell = "not run" if t.get("status", "").startswith("not run") else "failed"
            notes.append(f"PyTorch {label}: {t.get('status')}")
        else:
            t_cell = fmt(tm)
        params = f"{c.get('trainable_params', '?') if c_ok else '?'} / " + \
                 (f"{t.get('trainable_params', '?')}" if t_ok else "—")
        out.append(f"| {label} | {fmt(cm)} | {t_cell} | {sr_s} | {fmt(c.get('tokens_per_s') if c_ok else None, '.0f')} "
                   f"| {fmt(t.get('tokens_per_s') if t_ok else None, '.0f')} | {fmt(cr, '.0f')} | {fmt(tr, '.0f')} "
                   f"| {rr_s} | {params} |")
    if notes:
        out.append("")
        out += [f"- {n}" for n in notes]
    if a.repeats > 1:
        out.append(f"\nms/step of each of the {a.repeats} alternated runs (the table shows the median run's):")
        for key, label, *_ in METHODS:
            if key not in res["runs"]:
                continue
            sides = []
            for side, name in (("peft_cpp", "peft-cpp"), ("pytorch", "PyTorch")):
                r = res["runs"][key][side]
                if r and r.get("repeat_ms_per_step"):
                    sides.append(f"{name} " + ", ".join(fmt(x) for x in r["repeat_ms_per_step"]))
            if sides:
                out.append(f"- {label}: " + "; ".join(sides))

    # Step-0 (and last-step) losses.
    out.append("\n| run | step-0 loss peft-cpp | step-0 loss PyTorch | relative difference | last-step loss "
               "peft-cpp | last-step loss PyTorch |")
    out.append("|---|---|---|---|---|---|")
    for key, label, *_ in METHODS:
        if key not in res["runs"]:
            continue
        c, t = res["runs"][key]["peft_cpp"], res["runs"][key]["pytorch"]
        cl = c.get("losses") if c.get("status") == "ok" else None
        tl = t.get("losses") if t is not None and t.get("status") == "ok" else None
        rel = abs(cl[0] - tl[0]) / abs(tl[0]) if cl and tl else None
        if rel is None:
            rel_s = "—"
        elif key in ("lora", "dora"):
            rel_s = f"{rel:.2e} ({'agree' if rel <= a.loss_rtol else '**DISAGREE**'}, tolerance {a.loss_rtol:g})"
        else:
            rel_s = f"{rel:.2e} (different 4-bit quantizers)"
        out.append(f"| {label} | {fmt(cl[0] if cl else None, '.6f')} | {fmt(tl[0] if tl else None, '.6f')} | {rel_s} "
                   f"| {fmt(cl[-1] if cl else None, '.6f')} | {fmt(tl[-1] if tl else None, '.6f')} |")

    # Generation.
    g = res.get("generation")
    if g:
        cu, cb = g["peft_cpp"].get("unmerged", {}), g["peft_cpp"].get("base", {})
        tg = g.get("pytorch") or {}
        tu, tm_ = (tg.get("unmerged") or {}), (tg.get("merged") or {})
        cu_v = cu.get("decode_tokens_per_s") if cu.get("status") == "ok" else None
        cb_v = cb.get("decode_tokens_per_s") if cb.get("status") == "ok" else None
        tu_v, tm_v = tu.get("decode_tokens_per_s"), tm_.get("decode_tokens_per_s")
        out.append(f"\nGeneration: greedy, {a.prompt_len}-token prompt, {a.max_new_tokens} new tokens, "
                   f"decoding tokens/s (prompt pass excluded), median of {a.gen_repeats} after a warm-up.\n")
        out.append("| | peft-cpp tokens/s | PyTorch tokens/s | peft-cpp / PyTorch |")
        out.append("|---|---|---|---|")
        out.append(f"| LoRA adapter, unmerged | {fmt(cu_v)} | {fmt(tu_v)} | {fmt(ratio(cu_v, tu_v), '.2f')} |")
        out.append(f"| merged (peft-cpp: the base model alone; PyTorch: merge_and_unload) | {fmt(cb_v)} | {fmt(tm_v)} "
                   f"| {fmt(ratio(cb_v, tm_v), '.2f')} |")
        gc, gt = ratio(cu_v, cb_v), ratio(tu_v, tm_v)
        out.append(f"| unmerged / merged | {fmt(gc, '.3f')} ({verdict(gc, TARGET_GEN_RATIO, at_most=False)}, target "
                   f">= {TARGET_GEN_RATIO}) | {fmt(gt, '.3f')} | |")
        if "repeat_tokens_per_s" in cu or "repeat_tokens_per_s" in cb:
            out.append(f"\npeft-cpp decoding tokens/s of each of the {a.repeats} alternated processes (the table shows "
                       "the median process's):")
            for who, rec in (("unmerged", cu), ("base", cb)):
                if "repeat_tokens_per_s" in rec:
                    out.append(f"- {who}: " + ", ".join(fmt(v) for v in rec["repeat_tokens_per_s"]))
        for who, rec in (("peft-cpp unmerged", cu), ("peft-cpp base", cb)):
            if rec.get("status") != "ok":
                out.append(f"\n- {who}: {rec.get('status')}")
        if tg.get("status") not in (None, "ok"):
            out.append(f"\n- PyTorch generation: {tg.get('status')}")

    # Targets.
    out.append("\n| target | value | result |")
    out.append("|---|---|---|")
    for t in res["targets"]:
        out.append(f"| {t['what']} | {fmt(t['value'], '.3f')} | {t['result']} |")
    return "\n".join(out)


def targets_of(res):
    def ms(key, side):
        r = res["runs"].get(key, {}).get(side)
        return r.get("ms_per_step") if r and r.get("status") == "ok" else None

    def rss_(key, side):
        r = res["runs"].get(key, {}).get(side)
        return r.get("peak_rss_kib") if r and r.get("status") == "ok" else None

    t = []
    v = ratio(ms("lora", "peft_cpp"), ms("lora", "pytorch"))
    t.append({"what": f"LoRA step time peft-cpp / PyTorch <= {TARGET_STEP_RATIO}", "value": v,
              "result": verdict(v, TARGET_STEP_RATIO)})
    v = ratio(rss_("lora", "peft_cpp"), rss_("lora", "pytorch"))
    t.append({"what": f"LoRA peak RSS peft-cpp / PyTorch <= {TARGET_RSS_RATIO}", "value": v,
              "result": verdict(v, TARGET_RSS_RATIO)})
    if "dora" in res["runs"]:
        v = ratio(ms("dora", "peft_cpp"), ms("lora", "peft_cpp"))
        t.append({"what": f"DoRA / LoRA step time, peft-cpp <= {TARGET_DORA_CPP}", "value": v,
                  "result": verdict(v, TARGET_DORA_CPP)})
        v = ratio(ms("dora", "pytorch"), ms("lora", "pytorch"))
        t.append({"what": f"DoRA / LoRA step time, PyTorch (about {PYTORCH_DORA_EXPECTED:g} expected)", "value": v,
                  "result": "reference"})
    g = res.get("generation")
    if g:
        cu, cb = g["peft_cpp"].get("unmerged", {}), g["peft_cpp"].get("base", {})
        v = ratio(cu.get("decode_tokens_per_s"), cb.get("decode_tokens_per_s"))
        t.append({"what": f"generation unmerged / merged tokens/s, peft-cpp >= {TARGET_GEN_RATIO}", "value": v,
                  "result": verdict(v, TARGET_GEN_RATIO, at_most=False)})
        tg = g.get("pytorch") or {}
        v = ratio((tg.get("unmerged") or {}).get("decode_tokens_per_s"), (tg.get("merged") or {}).get("decode_tokens_per_s"))
        t.append({"what": "generation unmerged / merged tokens/s, PyTorch", "value": v, "result": "reference"})
    return t


# ---- main ---------------------------------------------------------------------------------------

def median_of(recs, key, repeats_key):
    """The record whose `key` is the median of the repeats (the lower middle one of an even count),
    with every repeat's `key` in `repeats_key`; a single record as it is."""
    if len(recs) == 1:
        return recs[0]
    ok = [r for r in recs if r.get("status") == "ok" and r.get(key) is not None]
    if not ok:
        return recs[0]
    ok.sort(key=lambda r: r[key])
    rec = dict(ok[(len(ok) - 1) // 2])
    rec[repeats_key] = [r.get(key) for r in recs]
    return rec


def median_run(recs):
    """The fine-tuning run whose mean step time is the median (repeat_ms_per_step lists all)."""
    return median_of(recs, "ms_per_step", "repeat_ms_per_step")


def median_generation(recs):
    """The generate process whose decoding tokens/s is the median (repeat_tokens_per_s lists all)."""
    return median_of(recs, "decode_tokens_per_s", "repeat_tokens_per_s")


def run_shape(a, shape, env):
    shape_dir = a.work / f"run-{shape}"
    shape_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(a.work, shape, a.seed)
    cfg = model_vocab(model_dir)
    V = cfg["vocab_size"]
    tokens = ensure_tokens(a.work, V, a.steps * a.batch, a.seq_len, a.seed)
    prompt = ensure_prompt(a.work, V, a.prompt_len, a.gen_repeats + 1, a.seed)
    res = {"config": cfg, "model_dir": str(model_dir), "tokens": str(tokens),
           "params": safetensors_params(model_dir / "model.safetensors"), "runs": {}}
    lora_adapter = None
    torch_gen = None
    for key, label, method, quant, variant in METHODS:
        if (quant and a.skip_qlora) or (a.methods and key not in a.methods):
            continue
        cs, ts = [], []
        for rep in range(a.repeats):  # alternated, so the machine's slow spells fall on both sides
            if a.repeats > 1:
                log(f"{key}: repeat {rep + 1} of {a.repeats}")
            c, out = cpp_finetune(a, shape_dir, model_dir, tokens, key, method, quant, env)
            if key == "lora" and c.get("status") == "ok" and lora_adapter is None:
                lora_adapter = out
                if a.repeats > 1:  # later repeats overwrite the directory: keep this one for generation
                    kept = shape_dir / "cpp-lora-kept"
                    if kept.exists():
                        shutil.rmtree(kept)
                    shutil.copytree(out, kept)
                    lora_adapter = kept
            cs.append(c)
            if variant:
                gen = key == "lora" and not a.skip_generate and rep == 0
                t = torch_run(a, shape_dir, model_dir, tokens, prompt if gen else None, key, variant, gen, env)
                if gen:
                    torch_gen = t.pop("generation", None) or {"status": f"not run: training {t.get('status')}"}
                ts.append(t)
        res["runs"][key] = {"peft_cpp": median_run(cs), "pytorch": median_run(ts) if ts else None}
    if not a.skip_generate:
        g = {"peft_cpp": {}, "pytorch": torch_gen}
        # With --repeats K: K processes per side, unmerged and base alternated (decoding is memory
        # bound, and this VM's memory bandwidth drifts between processes); each side's median process.
        unmerged, base = [], []
        for rep in range(a.repeats):
            if a.repeats > 1:
                log(f"generation: repeat {rep + 1} of {a.repeats}")
            if lora_adapter:
                unmerged.append(cpp_generate(a, shape_dir, model_dir, prompt, lora_adapter, "generate-lora", env))
            base.append(cpp_generate(a, shape_dir, model_dir, prompt, None, "generate-base", env))
        g["peft_cpp"]["unmerged"] = (median_generation(unmerged) if unmerged else
                                     {"status": "not run: the LoRA fine-tuning failed"})
        g["peft_cpp"]["base"] = median_generation(base)
        res["generation"] = g
    res["targets"] = targets_of(res)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    ap.add_argument("--peft", default=str(ROOT / "build" / "examples" / "peft"), help="the peft CLI (default %(default)s)")
    ap.add_argument("--shapes", default="bench-33m,bench-100m",
                    help="comma-separated make_random_llama.py shapes (default %(default)s)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="first steps excluded from ms/step (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--seed", type=int, default=0, help="model weights, token ids, adapter init")
    ap.add_argument("--work", default="/tmp/peft_compare", help="models, token files, logs (default %(default)s)")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--skip-qlora", action="store_true")
    ap.add_argument("--methods", default="", help="only these runs, comma-separated: " +
                    ",".join(m[0] for m in METHODS) + " (default: all)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fine-tuning runs per method and side, alternated; the report takes the run with "
                         "the median step time and lists every repeat's (default 1)")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gen-repeats", type=int, default=3, help="timed generations per side, after one warm-up")
    ap.add_argument("--loss-rtol", type=float, default=1e-3, help="step-0 losses must agree this closely")
    a = ap.parse_args()
    if a.torch_worker:
        torch_worker(a.torch_worker)
        return 0
    if a.steps <= a.warmup:
        ap.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    a.methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in a.methods if m not in [x[0] for x in METHODS]]
    if unknown:
        ap.error(f"--methods: unknown run {unknown[0]} (known: {', '.join(x[0] for x in METHODS)})")
    if a.alpha == int(a.alpha):
        a.alpha = int(a.alpha)
    a.peft = str(Path(a.peft).resolve())
    if not os.access(a.peft, os.X_OK):
        ap.error(f"no peft CLI at {a.peft} (build it, or give --peft PATH)")
    a.work = Path(a.work).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    shapes = [s for s in a.shapes.split(",") if s]

    cpu, flags = cpu_info()
    meta = {"command": shlex.join([sys.executable] + sys.argv), "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "cpu": cpu, "cpus": os.cpu_count(), "peft_cpp_isa": peft_cpp_isa(flags),
        "peft_cli": a.peft, "versions": versions(), "loadavg_start": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "torch_worker"}}
    env = thread_env(a.threads)
    results = {"meta": meta, "shapes": {}}
    meta["cpu_busy_between_runs"] = BUSY_SAMPLES
    for shape in shapes:
        log(f"== {shape}")
        results["shapes"][shape] = run_shape(a, shape, env)
        if a.json:  # partial results survive a later failure
            Path(a.json).write_text(json.dumps(results, indent=1))
    sample_busy("at the end")
    meta["loadavg_end"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))

    v = meta["versions"]
    print("## peft-cpp against HuggingFace PEFT on PyTorch CPU: LoRA fine-tuning\n")
    print(f"- command: `{meta['command']}`")
    print(f"- date: {meta['date']}")
    print(f"- CPU: {cpu} ({meta['cpus']} logical CPUs); peft-cpp kernels: {meta['peft_cpp_isa']}")
    print(f"- torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, bitsandbytes "
          f"{v['bitsandbytes'] or 'not installed'}; Python {v['python']}")
    known = [x for x in BUSY_SAMPLES if x["busy"] is not None]
    if known:
        top = max(known, key=lambda x: x["busy"])
        print(f"- CPUs busy with other processes, 1 s samples before each run: median "
              f"{100 * statistics.median(x['busy'] for x in known):.0f}%, highest {100 * top['busy']:.0f}% "
              f"({top['when']}); measurements ran one at a time")
    if any(x["busy"] > BUSY_WARN for x in known):
        print("- **warning: other processes were using the CPUs; with every core in use, threads that wait for "
              "each other are descheduled and the times are not representative**")
    print("- peak RSS: each run's own process (wait4's ru_maxrss for peft-cpp, getrusage(RUSAGE_SELF) in the "
          "PyTorch process, which includes Python and the imported libraries)")
    for shape in shapes:
        print()
        print(shape_report(a, shape, results["shapes"][shape]))
        r = results["shapes"][shape]["runs"].get("lora", {}).get("pytorch") or {}
        if r.get("status") == "ok" and r.get("rss_after_imports_kib"):
            print(f"\nPyTorch LoRA process RSS after `import torch, transformers, peft`: "
                  f"{r['rss_after_imports_kib'] / 1024:.0f} MiB; after loading the model: "
                  f"{r.get('rss_after_load_kib', 0) / 1024:.0f} MiB; peak in training: "
                  f"{r['peak_rss_kib'] / 1024:.0f} MiB ({(r['peak_rss_kib'] - r['rss_after_imports_kib']) / 1024:.0f} MiB "
                  f"above the imports); wait4's figure for the process and its children (importing torch forks "
                  f"one): {r['peak_rss_kib_wait4'] / 1024:.0f} MiB.")
    if a.json:
        print(f"\nRaw numbers: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
