#!/usr/bin/env python3
"""Speed of peft-cpp against llama.cpp: one unmerged rank-16 LoRA over a Q4_K base, same threads.

Measures tokens/s of prompt processing (a 512-token prompt) and of generation (128 decoding steps
after that prompt), with and without the adapter, for llama.cpp and for our `peft generate`, in one
run on one machine with the same number of threads. The adapter is the SAME file for both: a PEFT
LoRA (r=16, alpha=32, q/k/v/o/gate/up/down, random nonzero B) that our `peft export --gguf` turns
into a llama.cpp LoRA GGUF; peft-cpp reads the PEFT directory, llama.cpp the exported GGUF.

  scripts/llama_cpp/build.sh                             # once: llama.cpp 0.3.36 + Python deps
  python3 benchmarks/compare_llama_cpp.py                # small model (hidden 1024, 12 layers)
  python3 benchmarks/compare_llama_cpp.py --size medium  # TinyLlama-1.1B's shape

How each side is timed:
  llama.cpp: llama-bench of this version has no LoRA option, so the four llama.cpp numbers come
    from the Python binding (the ctypes layer over the libllama.so that build.sh built): one
    llama_decode of the 512-token prompt, then 128 llama_decode calls of one token each (greedy
    argmax feeding the next token), with llama.cpp's own counters (llama_perf_context: t_p_eval_ms,
    t_eval_ms; what llama-cli prints as "prompt eval time" / "eval time"). Wall-clock around the
    decode calls is recorded too. llama-bench (no LoRA) is run on the base as a cross-check.
  peft-cpp: `peft generate --timings --ignore-eos --max-new-tokens 129` (the first new token comes
    from the prompt pass; 128 decoding steps follow), its own stderr timing line.
Each configuration runs --reps times (default 3); the table gives the medians.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "llama_cpp"))
import make_gguf_references as refs  # noqa: E402  (tokenizer, model, weights, conversion helpers)

SEED = 20261202
TARGETS = refs.TARGETS
SIZES = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=4),
    "medium": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4),  # TinyLlama-1.1B
}
VOCAB = 32000
MAX_POS = 2048


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def case_for(size: str) -> dict:
    shape = SIZES[size]
    cfg = dict(vocab_size=VOCAB, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
               hidden_act="silu", max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
               bos_token_id=0, eos_token_id=1, pad_token_id=None, **shape)
    return dict(arch="LlamaForCausalLM", config=cfg, permute_qk=True)


# --------------------------------------------------------------------------------------------
# model, adapter, GGUF files (cached under --work/<size>)
# --------------------------------------------------------------------------------------------
def make_hf_model(case: dict, hf: Path, seed: int):
    """Random Llama checkpoint (f16) + the reference script's small byte-level BPE tokenizer.

    The tokenizer has refs.VOCAB (320) entries; the model's vocabulary is 32000: convert_hf_to_gguf
    fills ids past the tokenizer with [PAD<i>] tokens of type UNUSED. Only token ids are fed.
    """
    import torch

    tmp = hf.with_name(hf.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    refs.make_tokenizer(tmp)
    tc = json.loads((tmp / "tokenizer_config.json").read_text())
    tc["model_max_length"] = MAX_POS
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    model = refs.build_model(case, torch.float32)
    sd = refs.make_weights(model, seed)
    refs.load_sd(model, {k: v.float() for k, v in sd.items()})
    del sd
    model = model.to(torch.float16)
    model.save_pretrained(str(tmp), safe_serialization=True)
    gen_cfg = tmp / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    del model
    if hf.exists():
        shutil.rmtree(hf)
    tmp.rename(hf)


def make_adapter(case: dict, out_dir: Path, seed: int, rank: int, alpha: int):
    """PEFT LoRA on every attention and MLP projection; A and B random (B nonzero), seeded."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = refs.build_model(case, torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM", init_lora_weights=True)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sorted(pm.named_modules()):
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                a = mod.lora_A["default"].weight
                b = mod.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=g, dtype=torch.float64) / math.sqrt(a.shape[1]))
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.05)
    pm.peft_config["default"].base_model_name_or_path = None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pm.save_pretrained(str(tmp))
    readme = tmp / "README.md"
    if readme.exists():
        readme.unlink()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def prepare(args, ll: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    case = case_for(args.size)
    d = (args.work / args.size).resolve()
    d.mkdir(parents=True, exist_ok=True)
    stamp = d / "config.json"
    want = dict(case=case, seed=SEED, rank=args.rank, alpha=args.alpha)
    if stamp.exists() and json.loads(stamp.read_text()) != want:
        log(f"{d}: cached files are for another configuration; rebuilding")
        for p in d.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    hf, lora_dir = d / "hf", d / "peft_lora"
    f16, q4km, q4k = d / "f16.gguf", d / "q4_k_m.gguf", d / "q4_k.gguf"
    t0 = time.time()
    if not (hf / "model.safetensors").exists():
        log(f"making the HF model in {hf}")
        make_hf_model(case, hf, SEED)
    if not (lora_dir / "adapter_model.safetensors").exists():
        log(f"making the PEFT LoRA in {lora_dir}")
        make_adapter(case, lora_dir, SEED + 1, args.rank, args.alpha)
    stamp.write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
    quantize = ll / "build" / "bin" / "llama-quantize"
    if not f16.exists():
        tmp = f16.with_suffix(".tmp")
        refs.run([sys.executable, REPO / "scripts" / "llama_cpp" / "convert_hf_to_gguf_wrapper.py", ll,
                  hf, "--outtype", "f16", "--outfile", tmp])
        tmp.rename(f16)
    for path, qtype, pure in ((q4km, "Q4_K_M", False), (q4k, "Q4_K", True)):
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            refs.run([quantize] + (["--pure"] if pure else []) + [f16, tmp, qtype, str(args.threads)])
            tmp.rename(path)
    log(f"model files ready ({time.time() - t0:.0f} s)")
    return dict(dir=d, case=case, hf=hf, lora_dir=lora_dir, f16=f16, q4_k_m=q4km, q4_k=q4k)


def export_adapter(args, files: dict) -> Path:
    """Our `peft export --gguf`: the llama.cpp LoRA both sides use (rewritten every run, since the
    binary may have changed)."""
    out = files["dir"] / "lora_by_peft_export.gguf"
    res = subprocess.run([str(args.peft), "export", "--gguf", str(files["lora_dir"]),
                          "--model", str(files["hf"]), "--out", str(out)], text=True, capture_output=True)
    if res.returncode != 0:
        raise SystemExit(f"peft export --gguf failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return out


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------
def llama_cpp_run(model: Path, prompt: list[int], n_gen: int, threads: int, lora: Path | None,
                  reps: int, flash_attn: bool) -> dict:
    """Prompt in one llama_decode, then n_gen single-token llama_decode calls (greedy), `reps`
    times on one context (KV cache cleared in between) after one untimed warm-up round."""
    import llama_cpp

    kw = dict(model_path=str(model), n_ctx=len(prompt) + n_gen + 16, n_batch=len(prompt),
              n_ubatch=len(prompt), n_threads=threads, n_threads_batch=threads, verbose=False,
              seed=1, flash_attn=flash_attn, logits_all=False)
    if lora is not None:
        kw.update(lora_path=str(lora), lora_scale=1.0)
    llm = llama_cpp.Llama(**kw)
    ctx = llm._ctx.ctx
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))
    big = llama_cpp.llama_batch_init(len(prompt), 0, 1)
    one = llama_cpp.llama_batch_init(1, 0, 1)

    def fill(batch, toks, pos0):
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 0
        batch.logits[len(toks) - 1] = 1

    def argmax_last():
        p = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(p, shape=(n_vocab,)).argmax())

    def decode(batch):
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    runs = []
    for r in range(reps + 1):  # round 0: warm-up
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        llama_cpp.llama_synchronize(ctx)
        llama_cpp.llama_perf_context_reset(ctx)
        fill(big, prompt, 0)
        t0 = time.perf_counter()
        decode(big)
        llama_cpp.llama_synchronize(ctx)
        t_pp = time.perf_counter() - t0
        tok = argmax_last()
        out = [tok]
        t_tg = 0.0
        for step in range(n_gen):
            fill(one, [tok], len(prompt) + step)
            t0 = time.perf_counter()
            decode(one)
            llama_cpp.llama_synchronize(ctx)
            t_tg += time.perf_counter() - t0
            tok = argmax_last()
            out.append(tok)
        perf = llama_cpp.llama_perf_context(ctx)
        if r == 0:
            continue
        assert perf.n_p_eval == len(prompt) and perf.n_eval == n_gen, (perf.n_p_eval, perf.n_eval)
        runs.append(dict(pp=len(prompt) / (perf.t_p_eval_ms / 1e3), tg=n_gen / (perf.t_eval_ms / 1e3),
                         pp_wall=len(prompt) / t_pp, tg_wall=n_gen / t_tg, tokens=out))
    llama_cpp.llama_batch_free(big)
    llama_cpp.llama_batch_free(one)
    llm.close()
    return summarize(runs)


def summarize(runs: list[dict]) -> dict:
    res = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "tokens"}
    res["all"] = {k: [round(r[k], 2) for r in runs] for k in runs[0] if k != "tokens"}
    res["tokens"] = runs[-1].get("tokens")
    return res


def llama_bench(bench: Path, model: Path, args) -> list[dict]:
    """llama-bench on the base (it has no LoRA option): pp512 + tg128 at depth 0, and tg128 after a
    512-token context (-d 512), which is where both sides' generation numbers above are taken."""
    out = []
    for extra in (["-p", str(args.prompt), "-n", str(args.gen)],
                  ["-p", "0", "-n", str(args.gen), "-d", str(args.prompt)]):
        cmd = [str(bench), "-m", str(model), "-t", str(args.threads), "-r", str(args.reps),
               "-o", "json"] + extra
        log("+ " + " ".join(cmd))
        res = subprocess.run(cmd, text=True, capture_output=True)
        if res.returncode != 0:
            log(f"llama-bench failed ({res.returncode}): {res.stderr[-2000:]}")
            continue
        for t in json.loads(res.stdout):
            out.append(dict(n_prompt=t["n_prompt"], n_gen=t["n_gen"], n_depth=t.get("n_depth", 0),
                            avg_ts=t["avg_ts"], stddev_ts=t["stddev_ts"], flash_attn=t.get("flash_attn"),
                            type_k=t.get("type_k"), cmd=" ".join(shlex.quote(c) for c in cmd)))
    return out


# --------------------------------------------------------------------------------------------
# peft-cpp
# --------------------------------------------------------------------------------------------
TIMING_RE = re.compile(r"peft: prompt (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\), (\d+) decoding "
                       r"steps in ([\d.]+) s \(([\d.]+) tokens/s\)")


def peft_run(args, model: Path, tokens_file: Path, adapter: Path | None, n_prompt: int, extra=()) -> dict:
    cmd = [str(args.peft), "generate", "--model", str(model), *extra]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    cmd += ["--tokens", str(tokens_file), "--max-new-tokens", str(args.gen + 1), "--threads",
            str(args.threads), "--ignore-eos", "--timings"]
    runs = []
    for r in range(args.reps):
        log("+ " + " ".join(cmd))
        t0 = time.perf_counter()
        res = subprocess.run(cmd, text=True, capture_output=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"peft generate failed ({res.returncode}):\n{res.stderr[-3000:]}")
        m = TIMING_RE.search(res.stderr)
        if not m:
            raise SystemExit(f"no timing line in peft's stderr:\n{res.stderr[-3000:]}")
        np_, tp, _, nd, td, _ = m.groups()
        assert int(np_) == n_prompt and int(nd) == args.gen, (np_, nd)
        ids = [int(x) for x in res.stdout.split()]
        runs.append(dict(pp=n_prompt / float(tp), tg=args.gen / float(td), process_wall=wall,
                         tokens=ids[-(args.gen + 1):]))
        log(f"  {m.group(0)}  (process {wall:.1f} s)")
    out = summarize(runs)
    out["cmd"] = " ".join(shlex.quote(c) for c in cmd)
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def cpu_idle_fraction(seconds: float) -> float:
    """Idle share of all CPUs over `seconds`, from /proc/stat (1.0 = nothing else runs)."""
    def snap():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return f[3] + f[4], sum(f[:8])  # idle + iowait, total (without guest)
    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def measured(fn, *a, **kw) -> dict:
    """fn(*a, **kw) plus `others`: the share of the machine's CPU time that processes other than
    this one and its children used meanwhile (0 = the benchmark had the machine to itself)."""
    import resource

    def snap():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        ours = sum(r.ru_utime + r.ru_stime for r in ru)
        return sum(f[:8]) - f[3] - f[4], sum(f[:8]), ours
    hz = os.sysconf("SC_CLK_TCK")
    b0, t0, o0 = snap()
    out = fn(*a, **kw)
    b1, t1, o1 = snap()
    out["others"] = max(0.0, ((b1 - b0) / hz - (o1 - o0)) / max(1e-9, (t1 - t0) / hz))
    return out


def wait_idle(max_wait: float, want: float = 0.9) -> str:
    """Wait (up to max_wait s) until the CPUs are >= `want` idle over 5 s; says what it saw."""
    t0 = time.time()
    idle = cpu_idle_fraction(5)
    while idle < want and time.time() - t0 < max_wait:
        log(f"machine busy ({(1 - idle) * 100:.0f}% of the CPUs in use by others); waiting ...")
        idle = cpu_idle_fraction(25)
    return f"{(1 - idle) * 100:.0f}% CPU busy just before the runs (waited {time.time() - t0:.0f} s)"


def machine() -> dict:
    info = dict(model="?", flags=set())
    try:
        txt = subprocess.run(["lscpu"], text=True, capture_output=True).stdout
        for line in txt.splitlines():
            if line.startswith("Model name:"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                info["flags"] = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return info


def peft_isa(flags: set) -> str:
    """`peft` has no command that prints its kernel ISA: infer what peft::kernels::best_isa() picks
    (the most derived of avx512 > avx2 > portable this CPU runs, capped by PEFT_ISA)."""
    cap = os.environ.get("PEFT_ISA")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and cap in (None, "avx512"):
        isa = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags and cap in (None, "avx512", "avx2"):
        isa = "avx2"
    else:
        isa = "portable"
    return f"{isa} (inferred from the CPU flags; PEFT_ISA={cap or 'unset'})"


def gguf_types(path: Path) -> str:
    import gguf

    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in r.tensors:
        if len(t.shape) >= 2 and int(min(t.shape)) > 1:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def render(args, files, model: Path, lora_gguf: Path, res: dict, lb: list[dict], mach: dict,
           versions: dict, agree: dict, cmdline: str, load) -> str:
    cfg = files["case"]["config"]
    rows = [("llama.cpp base", res["lc_base"]), ("llama.cpp + LoRA", res["lc_lora"]),
            ("peft-cpp base", res["pc_base"]), ("peft-cpp + LoRA", res["pc_lora"]),
            ("peft-cpp base, --int8-activations", res["pc_base_i8"]),
            ("peft-cpp + LoRA, --int8-activations", res["pc_lora_i8"])]
    L = []
    L.append(f"# peft-cpp vs llama.cpp: {args.size} Llama-shaped model, {model.name}, "
             f"rank-{args.rank} LoRA unmerged, {args.threads} threads\n")
    L.append(f"| configuration | pp{args.prompt} tok/s | tg{args.gen} tok/s (after a {args.prompt}-token prompt) |")
    L.append("|---|---:|---:|")
    for name, r in rows:
        L.append(f"| {name} | {r['pp']:.1f} | {r['tg']:.2f} |")
    L.append("")
    L.append(f"Medians of {args.reps} runs. Every run: "
             + "; ".join(f"{n}: pp {r['all']['pp']}, tg {r['all']['tg']}" for n, r in rows) + ".")
    L.append("")
    L.append("CPU time used by other processes while each row ran (share of the machine; 0% = undisturbed): "
             + ", ".join(f"{n} {r['others'] * 100:.0f}%" for n, r in rows) + ".")
    L.append("")

    def over(b, l, k):
        return (b[k] / l[k] - 1) * 100  # time overhead = base tok/s / lora tok/s - 1

    L.append("| ratio | pp | tg |")
    L.append("|---|---:|---:|")
    L.append(f"| llama.cpp adapter overhead (time, base tok/s / LoRA tok/s - 1) | "
             f"{over(res['lc_base'], res['lc_lora'], 'pp'):+.1f}% | {over(res['lc_base'], res['lc_lora'], 'tg'):+.1f}% |")
    L.append(f"| peft-cpp adapter overhead (time) | "
             f"{over(res['pc_base'], res['pc_lora'], 'pp'):+.1f}% | {over(res['pc_base'], res['pc_lora'], 'tg'):+.1f}% |")
    L.append(f"| peft-cpp + LoRA / llama.cpp + LoRA (tok/s) | "
             f"{res['pc_lora']['pp'] / res['lc_lora']['pp']:.2f}x | {res['pc_lora']['tg'] / res['lc_lora']['tg']:.2f}x |")
    L.append(f"| peft-cpp base / llama.cpp base (tok/s) | "
             f"{res['pc_base']['pp'] / res['lc_base']['pp']:.2f}x | {res['pc_base']['tg'] / res['lc_base']['tg']:.2f}x |")
    L.append(f"| peft-cpp adapter overhead (time), --int8-activations | "
             f"{over(res['pc_base_i8'], res['pc_lora_i8'], 'pp'):+.1f}% | {over(res['pc_base_i8'], res['pc_lora_i8'], 'tg'):+.1f}% |")
    L.append(f"| peft-cpp + LoRA / llama.cpp + LoRA (tok/s), --int8-activations | "
             f"{res['pc_lora_i8']['pp'] / res['lc_lora']['pp']:.2f}x | {res['pc_lora_i8']['tg'] / res['lc_lora']['tg']:.2f}x |")
    L.append("")
    L.append("Targets (issue): peft-cpp adapter overhead <= 5%; peft-cpp + LoRA >= 1.0x llama.cpp + LoRA "
             "for generation; prompt processing reported as measured.")
    L.append("")
    L.append("## How it was measured\n")
    L.append(f"- llama.cpp rows: the Python binding of llama-cpp-python {versions['llama_cpp_python']} "
             f"(ctypes over the libllama.so built by scripts/llama_cpp/build.sh; vendored llama.cpp "
             f"{versions['llama_cpp_commit']}), because this version's llama-bench has no LoRA option. "
             f"One llama_decode of the {args.prompt}-token prompt (n_batch = n_ubatch = {args.prompt}), then "
             f"{args.gen} single-token llama_decode calls feeding the greedy argmax; "
             f"tok/s from llama.cpp's own counters (llama_perf_context t_p_eval_ms / t_eval_ms, as llama-cli prints). "
             f"Flash attention {'on' if args.flash_attn == 'on' else 'off'} (llama-bench's default 'auto' turns it on "
             f"on CPU), KV cache f16, weight repacking on (defaults), LoRA via llama_adapter_lora_init + "
             f"llama_set_adapters_lora, scale 1.0. One untimed warm-up round, then {args.reps} timed rounds "
             f"on the same context (KV cache cleared in between).")
    L.append("  Wall-clock around the decode calls (Python side, excludes the argmax): "
             + "; ".join(f"{n}: pp {r['pp_wall']:.1f}, tg {r['tg_wall']:.2f}" for n, r in rows[:2]) + " tok/s.")
    L.append(f"- peft-cpp rows: `{res['pc_lora']['cmd']}` (and the same without --adapter), {args.reps} "
             f"processes; tok/s from its --timings line (prompt = the prompt pass; decoding = the "
             f"{args.gen} steps after the first new token, sampling included). peft-cpp reads the PEFT "
             f"directory; llama.cpp reads `peft export --gguf` of that same directory ({lora_gguf.name}, "
             f"{lora_gguf.stat().st_size / 1e6:.1f} MB).")
    if lb:
        L.append("- llama-bench (no LoRA support in this version), base model, cross-check of the binding's numbers:")
        for t in lb:
            what = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
            L.append(f"  - {what} @ depth {t['n_depth']}: {t['avg_ts']:.2f} ± {t['stddev_ts']:.2f} tok/s "
                     f"(flash_attn {t['flash_attn']}, type_k {t['type_k']}) — `{t['cmd']}`")
    L.append(f"- Same greedy tokens? llama.cpp vs peft-cpp, first {args.gen + 1} new tokens: "
             f"base {agree['base']}, LoRA {agree['lora']} leading tokens equal (random weights and "
             f"different Q8 activation rounding make near-ties diverge; a match of the first tokens "
             f"shows both run the same model and adapter).")
    L.append("")
    L.append("## Setup\n")
    flags = mach["flags"]
    L.append(f"- Machine: {mach['model']}, {os.cpu_count()} logical CPUs, "
             f"avx2 {'yes' if 'avx2' in flags else 'no'}, avx512f {'yes' if 'avx512f' in flags else 'no'}, "
             f"fma {'yes' if 'fma' in flags else 'no'}, f16c {'yes' if 'f16c' in flags else 'no'}, "
             f"avx_vnni {'yes' if 'avx_vnni' in flags else 'no'}; {platform.platform()}.")
    L.append(f"- peft-cpp kernels: {peft_isa(flags)}; binary {args.peft}.")
    L.append(f"- Model: LlamaForCausalLM, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
             f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads, {cfg['num_key_value_heads']} "
             f"kv heads, head_dim {cfg['head_dim']}, vocab {cfg['vocab_size']}, max positions {cfg['max_position_embeddings']}; "
             f"random weights (seed {SEED}). {model.name}: {model.stat().st_size / 1e6:.1f} MB "
             f"(2-D tensors: {gguf_types(model)}); f16.gguf {files['f16'].stat().st_size / 1e6:.1f} MB.")
    L.append(f"- Adapter: PEFT LoRA r={args.rank}, alpha={args.alpha} (scale {args.alpha / args.rank:g}), "
             f"targets {', '.join(TARGETS)}, random A and nonzero random B (seed {SEED + 1}), unmerged on both sides.")
    L.append(f"- Prompt: {args.prompt} random token ids (seed {SEED + 2}); generation: greedy, EOS ignored.")
    L.append(f"- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    L.append(f"- OMP_WAIT_POLICY: {args.omp_wait_policy} (same for llama.cpp, peft-cpp and llama-bench; "
             f"both libraries run their threads through OpenMP/libgomp).")
    L.append(f"- Load average (1/5/15 min) before the runs: {load[0]}; after: {load[1]} "
             f"(other processes on the machine share its {os.cpu_count()} CPUs with the benchmark).")
    L.append(f"- Command: `{cmdline}`")
    L.append("")
    return "\n".join(L)


def leading_equal(a, b) -> int:
    n = 0
    for x, y in zip(a or [], b or []):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "peft-cpp" / "bench")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results_llama_cpp.md")
    ap.add_argument("--peft", type=Path, default=Path("/tmp/bld/examples/peft"), help="our `peft` binary")
    ap.add_argument("--llama-cpp-dir", type=Path,
                    default=Path(os.environ.get("LLAMA_CPP_DIR", refs.DEFAULT_LLAMA_CPP_DIR)))
    ap.add_argument("--quant", choices=["q4_k_m", "q4_k"], default="q4_k_m",
                    help="which GGUF both sides run (q4_k: llama-quantize --pure Q4_K)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on")
    ap.add_argument("--no-llama-bench", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=600,
                    help="wait up to this many seconds for the other processes to leave the CPUs (0: no)")
    ap.add_argument("--omp-wait-policy", choices=["default", "passive", "active"], default="default",
                    help="OMP_WAIT_POLICY for both sides (both use OpenMP; 'passive' keeps waiting "
                         "threads from spinning, which matters when other processes share the CPUs)")
    args = ap.parse_args()
    if args.omp_wait_policy != "default":  # before libgomp is loaded (by torch or libggml)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    elif "OMP_WAIT_POLICY" in os.environ:
        args.omp_wait_policy = os.environ["OMP_WAIT_POLICY"].lower() + " (from the environment)"
    cmdline = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    cmdline = "python3 " + cmdline

    src = args.llama_cpp_dir.resolve()
    ll = src / "vendor" / "llama.cpp"
    bin_dir = ll / "build" / "bin"
    if not (bin_dir / "llama-quantize").exists():
        raise SystemExit(f"{bin_dir}/llama-quantize missing: run scripts/llama_cpp/build.sh first")
    if not args.peft.exists():
        raise SystemExit(f"{args.peft}: no such file (build the `peft` CLI, or give --peft)")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(ll / "gguf-py"))
    import llama_cpp
    import torch

    files = prepare(args, ll)
    model = files[args.quant]
    lora_gguf = export_adapter(args, files)
    rng = np.random.default_rng(SEED + 2)
    prompt = rng.integers(2, VOCAB, size=args.prompt).tolist()
    tokens_file = files["dir"] / f"prompt_{args.prompt}.txt"
    tokens_file.write_text(" ".join(map(str, prompt)) + "\n")

    idle_note = wait_idle(args.wait_idle) if args.wait_idle > 0 else "not checked"
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; {idle_note}"
    res = {}
    fa = args.flash_attn == "on"
    log("llama.cpp base ...")
    res["lc_base"] = measured(llama_cpp_run, model, prompt, args.gen, args.threads, None, args.reps, fa)
    log(f"  {res['lc_base']['all']}")
    log("llama.cpp + LoRA ...")
    res["lc_lora"] = measured(llama_cpp_run, model, prompt, args.gen, args.threads, lora_gguf, args.reps, fa)
    log(f"  {res['lc_lora']['all']}")
    log("peft-cpp base ...")
    res["pc_base"] = measured(peft_run, args, model, tokens_file, None, args.prompt)
    log("peft-cpp + LoRA ...")
    res["pc_lora"] = measured(peft_run, args, model, tokens_file, files["lora_dir"], args.prompt)
    # llama.cpp's arithmetic: activations rounded to 8 bits in the quantized products.
    log("peft-cpp base, --int8-activations ...")
    res["pc_base_i8"] = measured(peft_run, args, model, tokens_file, None, args.prompt, ["--int8-activations"])
    log("peft-cpp + LoRA, --int8-activations ...")
    res["pc_lora_i8"] = measured(peft_run, args, model, tokens_file, files["lora_dir"], args.prompt,
                                 ["--int8-activations"])
    lb = [] if args.no_llama_bench else llama_bench(bin_dir / "llama-bench", model, args)

    commit = subprocess.run(["git", "-C", str(ll), "rev-parse", "HEAD"], text=True,
                            capture_output=True).stdout.strip() or "unknown"
    sysinfo = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    versions = dict(llama_cpp_python=refs.LLAMA_CPP_PYTHON_VERSION, llama_cpp_commit=commit,
                    llama_cpp_system_info=f"`{sysinfo}`", torch=torch.__version__,
                    transformers=__import__("transformers").__version__, peft=__import__("peft").__version__)
    agree = dict(base=leading_equal(res["lc_base"]["tokens"], res["pc_base"]["tokens"]),
                 lora=leading_equal(res["lc_lora"]["tokens"], res["pc_lora"]["tokens"]))
    load_after = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(args, files, model, lora_gguf, res, lb, machine(), versions, agree, cmdline,
                  (load_before, load_after))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raw = {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in res.items()}
    (files["dir"] / "last_results.json").write_text(json.dumps(dict(results=raw, llama_bench=lb), indent=2) + "\n")
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
