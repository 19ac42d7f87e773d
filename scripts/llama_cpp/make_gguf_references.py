#!/usr/bin/env python3
"""Generate tests/data/gguf: tiny GGUF models, PEFT LoRA adapters and reference logits.

Everything here is for generating reference data only; the C++ build and tests of peft-cpp read
the files this writes and need neither Python nor llama.cpp.

  scripts/llama_cpp/build.sh                       # once: llama.cpp + Python packages
  python3 scripts/llama_cpp/make_gguf_references.py  # writes tests/data/gguf/ (about 1 minute)
  python3 scripts/llama_cpp/make_gguf_references.py --peft-cli build/examples/peft
      # also: our `peft export --gguf` adapters, run by llama.cpp (keys llama_cpp_our_lora*)
  python3 scripts/llama_cpp/make_gguf_references.py --peft-cli PATH --peft-cli-only
      # only that step, added to the existing tests/data/gguf/llama/reference.safetensors

Deterministic: every random draw comes from fixed seeds, so a rerun rewrites the same values
(the GGUF files, too, byte for byte, with the same llama.cpp version; torch's CPU kernels in
float64 give the same references to the last bits or close to it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_LLAMA_CPP_DIR = Path.home() / ".cache" / "peft-cpp" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"

SEED = 20260415
VOCAB = 320
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# GGUF files per case: name -> how it is made. "f16" comes from convert_hf_to_gguf.py, the rest
# from llama-quantize run on f16.gguf ("pure": --pure, every 2-D weight gets that type).
LLAMA_FILES = {
    "f16": None,
    "q8_0": ("Q8_0", True),
    "q4_0": ("Q4_0", True),
    "q4_k": ("Q4_K", True),
    "q6_k": ("Q6_K", True),
    "q4_k_m": ("Q4_K_M", False),
}
# qwen2 gets fewer files to keep tests/data/gguf small: Q8_0 and the pure types are covered by
# llama; Q4_K_M here quantizes the tied token_embd (= output), which llama does not have.
QWEN2_FILES = {
    "f16": None,
    "q4_k_m": ("Q4_K_M", False),
}

CASES = {
    "llama": dict(
        arch="LlamaForCausalLM",
        config=dict(
            vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_act="silu",
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
            bos_token_id=0, eos_token_id=1, pad_token_id=None,
        ),
        files=LLAMA_FILES,
        permute_qk=True,
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM",
        config=dict(
            vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
            max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
            tie_word_embeddings=True, use_sliding_window=False, max_window_layers=1,
            bos_token_id=0, eos_token_id=1,
        ),
        files=QWEN2_FILES,
        permute_qk=False,
    ),
}


def log(*a):
    print(*a, flush=True)


def run(cmd, **kw):
    log("+ " + " ".join(str(c) for c in cmd))
    res = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kw)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-5000:] + "\n" + res.stderr[-5000:] + "\n")
        raise SystemExit(f"command failed ({res.returncode}): {cmd[0]}")
    return res


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def make_tokenizer(out_dir: Path):
    """A byte-level BPE with VOCAB entries (2 specials + 256 bytes + merges), trained on GPL-3.

    The eos token is named <|endoftext|> because transformers 5 loads a Qwen2 checkpoint's
    tokenizer as Qwen2Tokenizer (from config.json's model_type), which adds <|endoftext|> when
    the vocabulary lacks it: the vocabulary would then outgrow the model's.
    """
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text_path = Path("/usr/share/common-licenses/GPL-3")
    text = text_path.read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=["<|bos|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = text.splitlines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": 128,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return text_path


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def make_weights(model, seed: int):
    """Random weights, rounded to float16 (the HF checkpoint is f16, so f16.gguf is exact)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    hidden = model.config.hidden_size
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        n = torch.randn(shape, generator=g, dtype=torch.float64)
        if name.endswith("norm.weight"):
            v = 1.0 + 0.1 * n
        elif name.endswith(".bias"):
            v = 0.5 * n
        elif "embed_tokens" in name:
            v = n
        elif name == "lm_head.weight":
            v = n * (2.0 / math.sqrt(hidden))
        else:  # linear (out, in)
            v = n * (1.0 / math.sqrt(shape[1]))
        sd[name] = v.to(torch.float16)
    return sd


def build_model(case: dict, dtype):
    import transformers
    import torch

    cfg_cls = getattr(transformers, case["arch"].replace("ForCausalLM", "Config"))
    cfg = cfg_cls(**case["config"])
    cfg.architectures = [case["arch"]]
    model_cls = getattr(transformers, case["arch"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(cfg).to(dtype)
    model.eval()
    return model


def load_sd(model, sd: dict):
    import torch

    own = model.state_dict()
    fixed = {}
    for k, v in sd.items():
        fixed[k] = v.to(own[k].dtype)
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if model.config.tie_word_embeddings:
        model.tie_weights()
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model


def logits_of(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].to(torch.float64).numpy()


# --------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------
def make_adapter(hf_dir: Path, case: dict, out_dir: Path, seed: int, patterns: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    base = build_model(case, torch.float32)
    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM", init_lora_weights=True)
    if patterns:
        cfg.update(use_rslora=True,
                   rank_pattern={"model.layers.1.mlp.down_proj": 4},
                   alpha_pattern={"model.layers.1.mlp.down_proj": 32,
                                  "model.layers.0.self_attn.k_proj": 4})
    peft_model = get_peft_model(base, LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in sorted(peft_model.named_modules()):
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                a = mod.lora_A["default"].weight
                b = mod.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=g, dtype=torch.float64) / math.sqrt(a.shape[1]))
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.05)
    peft_model.peft_config["default"].base_model_name_or_path = None
    if out_dir.exists():
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(str(out_dir))
    cfg_path = out_dir / "adapter_config.json"  # target_modules comes from a set: sort it
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["target_modules"] = sorted(cfg_json["target_modules"])
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    readme = out_dir / "README.md"  # PEFT's model-card template: noise, not needed
    if readme.exists():
        readme.unlink()


def peft_logits(base_f64, adapter_dir: Path, ids_lines):
    import copy
    import torch
    from peft import PeftModel

    m = copy.deepcopy(base_f64)
    pm = PeftModel.from_pretrained(m, str(adapter_dir))
    pm = pm.to(torch.float64)
    pm.eval()
    outs = []
    with torch.no_grad():
        for ids in ids_lines:
            outs.append(pm(input_ids=torch.tensor([ids]), use_cache=False).logits[0].to(torch.float64).numpy())
    return outs


# --------------------------------------------------------------------------------------------
# GGUF -> transformers (dequantized)
# --------------------------------------------------------------------------------------------
def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute (n_head = heads of that projection)."""
    shape = w.shape
    return (w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def gguf_tensors(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        out[t.name] = t
    return r, out


def gguf_state_dict(path: Path, case: dict, model) -> tuple[dict, dict]:
    """HF state dict whose values are the GGUF tensors dequantized by gguf-py (float64)."""
    import gguf
    import torch

    reader, tensors = gguf_tensors(path)
    arch = reader.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    n_blocks = model.config.num_hidden_layers
    tmap = gguf.get_tensor_name_map(arch_enum, n_blocks)
    sd = {}
    types = {}
    used = set()
    for name in model.state_dict().keys():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        t = tensors[gname]
        used.add(gname)
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        w = w.reshape(tuple(reversed([int(x) for x in t.shape])))  # ggml ne reversed = (rows, cols)
        if case["permute_qk"]:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                w = unpermute(w, model.config.num_attention_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                w = unpermute(w, model.config.num_key_value_heads)
        sd[name] = torch.from_numpy(np.ascontiguousarray(w))
        types[gname] = t.tensor_type.name
    extra = set(tensors) - used
    assert not extra, f"GGUF tensors not used: {extra}"
    return sd, types


# --------------------------------------------------------------------------------------------
# llama.cpp logits through llama-cpp-python (the ctypes layer over the libllama built here)
# --------------------------------------------------------------------------------------------
def llama_cpp_logits(model_path: Path, ids_lines, lora_path: Path | None = None):
    import llama_cpp

    outs = []
    for ids in ids_lines:
        kw = dict(model_path=str(model_path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1,
                  n_threads_batch=1, logits_all=True, verbose=False, seed=1,
                  flash_attn=False, type_k=0, type_v=0)  # KV cache in f32 (GGML_TYPE_F32 = 0)
        if lora_path is not None:
            kw.update(lora_path=str(lora_path), lora_scale=1.0)
        llm = llama_cpp.Llama(**kw)
        llm.eval(ids)
        outs.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
        llm.close()
    return outs


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """a = candidate, b = reference; both (tokens, vocab)."""
    def logsoftmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lb, la = logsoftmax(b), logsoftmax(a)
    kl = (np.exp(lb) * (lb - la)).sum(axis=-1)
    return dict(
        max_abs=float(np.abs(a - b).max()),
        max_rel=float(np.abs(a - b).max() / np.abs(b).max()),
        top1=float((a.argmax(-1) == b.argmax(-1)).mean()),
        mean_kl=float(kl.mean()),
    )


def fmt(c: dict) -> str:
    return (f"max|d| {c['max_abs']:.3e} (rel {c['max_rel']:.2e}), top-1 {c['top1'] * 100:.0f}%, "
            f"mean KL {c['mean_kl']:.2e}")


# --------------------------------------------------------------------------------------------
def save_safetensors(path: Path, tensors: dict, metadata: dict):
    from safetensors.numpy import save_file

    # one metadata entry: safetensors keeps __metadata__ in a hash map, so several keys would be
    # written in a random order and the file would not be byte-for-byte reproducible
    info = json.dumps({k: str(v) for k, v in sorted(metadata.items())}, sort_keys=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, str(path),
              metadata={"info": info})


def load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "np") as f:
        meta = json.loads((f.metadata() or {}).get("info", "{}"))
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out, meta


def read_tokens(path: Path):
    return [[int(x) for x in line.split()] for line in path.read_text().splitlines() if line.strip()]


def peft_cli_step(args, out: Path, ll: Path, ids_lines, report: list):
    """`peft export --gguf` of our own binary, then llama.cpp runs the f16 base with it."""
    cli = Path(args.peft_cli)
    if not cli.exists():
        raise SystemExit(f"--peft-cli {cli}: no such file")
    case_dir = out / "llama"
    ref_path = case_dir / "reference.safetensors"
    refs, meta = load_safetensors(ref_path)
    base = case_dir / "f16.gguf"
    for adapter, key in (("peft_lora", "llama_cpp_our_lora"),
                         ("peft_lora_patterns", "llama_cpp_our_lora_patterns")):
        hf_key = "hf_lora" if adapter == "peft_lora" else "hf_lora_patterns"
        dst = Path(f"/tmp/peft_cpp_our_{adapter}.gguf")
        res = subprocess.run([str(cli), "export", "--gguf", str(case_dir / adapter),
                              "--model", str(case_dir / "hf"), "--out", str(dst)],
                             text=True, capture_output=True)
        if res.returncode != 0:
            log(f"peft export --gguf {adapter} failed ({res.returncode}); skipping:\n"
                f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
            report.append(f"- our `peft export --gguf` of {adapter}: FAILED ({res.returncode})")
            continue
        outs = llama_cpp_logits(base, ids_lines, lora_path=dst)
        for li, o in enumerate(outs):
            refs[f"{key}.f16.{li}"] = o.astype(np.float32)
            c = compare(o, refs[f"{hf_key}.{li}"].astype(np.float64))
            msg = f"- llama.cpp f16 + our {adapter} vs {hf_key}, line {li}: {fmt(c)}"
            log(msg)
            report.append(msg)
    meta["peft_cli"] = "keys llama_cpp_our_lora* present"
    save_safetensors(ref_path, refs, meta)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "gguf")
    ap.add_argument("--llama-cpp-dir", type=Path,
                    default=Path(os.environ.get("LLAMA_CPP_DIR", DEFAULT_LLAMA_CPP_DIR)))
    ap.add_argument("--peft-cli", type=str, default=None,
                    help="our `peft` binary: also run `peft export --gguf` and llama.cpp with its output")
    ap.add_argument("--peft-cli-only", action="store_true",
                    help="with --peft-cli: only that step, on the existing references")
    args = ap.parse_args()

    t0 = time.time()
    src = args.llama_cpp_dir.resolve()
    ll = src / "vendor" / "llama.cpp"
    bin_dir = ll / "build" / "bin"
    quantize = bin_dir / "llama-quantize"
    if not quantize.exists():
        raise SystemExit(f"{quantize} missing: run scripts/llama_cpp/build.sh first")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    sys.path.insert(0, str(src))          # llama_cpp (the binding's pure-Python part)
    sys.path.insert(1, str(ll / "gguf-py"))  # the gguf-py matching the converters

    import torch
    torch.set_num_threads(2)
    import gguf  # noqa: F401
    import llama_cpp  # noqa: F401  (fails early if libllama does not load)

    out = args.out.resolve()
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(ll), "rev-parse", "HEAD"], text=True,
                                capture_output=True).stdout.strip() or "unknown"
    except OSError:
        pass
    versions = dict(
        llama_cpp_python=LLAMA_CPP_PYTHON_VERSION, llama_cpp_commit=commit,
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        peft=__import__("peft").__version__, tokenizers=__import__("tokenizers").__version__,
        gguf_py="vendored " + next((l.split('"')[1] for l in (ll / "gguf-py" / "pyproject.toml")
                                    .read_text().splitlines() if l.startswith("version")), "?"),
        numpy=np.__version__)

    if args.peft_cli_only:
        if not args.peft_cli:
            raise SystemExit("--peft-cli-only needs --peft-cli PATH")
        report = []
        peft_cli_step(args, out, ll, read_tokens(out / "tokens.txt"), report)
        readme = out / "README.md"
        if readme.exists():  # replace (or add) the README's section on our exporter
            text = readme.read_text()
            head = text.split("### our `peft export --gguf`")[0].rstrip("\n")
            readme.write_text(head + "\n\n### our `peft export --gguf`\n\n" + "\n".join(report) + "\n")
        log("\n".join(report))
        return

    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "_tokenizer_tmp"
    text_path = make_tokenizer(tok_dir)

    rng = np.random.default_rng(SEED)
    ids_lines = [rng.integers(2, VOCAB, size=24).tolist(), rng.integers(2, VOCAB, size=10).tolist()]
    (out / "tokens.txt").write_text("\n".join(" ".join(map(str, l)) for l in ids_lines) + "\n")

    readme_stats: dict[str, list[str]] = {}
    type_tables: dict[str, dict] = {}
    file_sizes: dict[str, int] = {}

    for ci, (cname, case) in enumerate(CASES.items()):
        log(f"== {cname}")
        cdir = out / cname
        if cdir.exists():
            shutil.rmtree(cdir)
        hf = cdir / "hf"
        hf.mkdir(parents=True)
        # --- HF checkpoint (f16)
        m16 = build_model(case, torch.float32)
        sd = make_weights(m16, SEED + 100 * ci)
        load_sd(m16, {k: v.float() for k, v in sd.items()})
        m16 = m16.to(torch.float16)
        m16.save_pretrained(str(hf), safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / f, hf / f)
        gen_cfg = hf / "generation_config.json"
        if gen_cfg.exists():
            gen_cfg.unlink()
        # --- float64 reference model with exactly those f16 values
        base64 = load_sd(build_model(case, torch.float64), {k: v.double() for k, v in sd.items()})
        refs = {}
        for li, ids in enumerate(ids_lines):
            refs[f"hf_base.{li}"] = logits_of(base64, ids)
        # --- adapters
        make_adapter(hf, case, cdir / "peft_lora", SEED + 100 * ci + 1, patterns=False)
        for li, o in enumerate(peft_logits(base64, cdir / "peft_lora", ids_lines)):
            refs[f"hf_lora.{li}"] = o
        if cname == "llama":
            make_adapter(hf, case, cdir / "peft_lora_patterns", SEED + 100 * ci + 2, patterns=True)
            for li, o in enumerate(peft_logits(base64, cdir / "peft_lora_patterns", ids_lines)):
                refs[f"hf_lora_patterns.{li}"] = o
        # --- GGUF: convert + quantize
        f16 = cdir / "f16.gguf"
        run([sys.executable, Path(__file__).with_name("convert_hf_to_gguf_wrapper.py"), ll,
             hf, "--outtype", "f16", "--outfile", f16, "--model-name", f"peft-cpp-test-{cname}"])
        for fname, spec in case["files"].items():
            if spec is None:
                continue
            qtype, pure = spec
            cmd = [quantize] + (["--pure"] if pure else []) + [f16, cdir / f"{fname}.gguf", qtype, "1"]
            res = run(cmd)
            if "imatrix" in (res.stdout + res.stderr).lower().replace("no imatrix", ""):
                # llama-quantize only mentions an imatrix when one is given; we never give one
                log("note: llama-quantize output mentions imatrix")
        run([sys.executable, ll / "convert_lora_to_gguf.py", "--base", hf, "--outtype", "f32",
             "--outfile", cdir / "lora_by_llama_cpp.gguf", cdir / "peft_lora"],
            env={**os.environ, "PYTHONPATH": str(ll / "gguf-py")})
        if cname == "llama":
            # not kept: shows what convert_lora_to_gguf.py makes of rsLoRA + rank/alpha patterns
            run([sys.executable, ll / "convert_lora_to_gguf.py", "--base", hf, "--outtype", "f32",
                 "--outfile", "/tmp/peft_cpp_patterns_by_llama_cpp.gguf", cdir / "peft_lora_patterns"],
                env={**os.environ, "PYTHONPATH": str(ll / "gguf-py")})
        # --- references per GGUF file
        stats = []
        for fname in case["files"]:
            path = cdir / f"{fname}.gguf"
            sd_q, types = gguf_state_dict(path, case, base64)
            type_tables[f"{cname}/{fname}.gguf"] = types
            mq = load_sd(build_model(case, torch.float64), sd_q)
            deq = [logits_of(mq, ids) for ids in ids_lines]
            deq_lora = peft_logits(mq, cdir / "peft_lora", ids_lines)
            lc = llama_cpp_logits(path, ids_lines)
            lcl = llama_cpp_logits(path, ids_lines, lora_path=cdir / "lora_by_llama_cpp.gguf")
            for li in range(len(ids_lines)):
                refs[f"dequant.{fname}.{li}"] = deq[li]
                if fname != "f16":  # for f16 it is hf_lora exactly (f16.gguf holds hf/'s values)
                    refs[f"dequant_lora.{fname}.{li}"] = deq_lora[li]
                refs[f"llama_cpp.{fname}.{li}"] = lc[li]
                refs[f"llama_cpp_lora.{fname}.{li}"] = lcl[li]
            for li in range(len(ids_lines)):
                stats.append(f"| {fname} | {li} | llama_cpp vs dequant | {fmt(compare(lc[li], deq[li]))} |")
                stats.append(f"| {fname} | {li} | llama_cpp_lora vs dequant_lora | {fmt(compare(lcl[li], deq_lora[li]))} |")
                stats.append(f"| {fname} | {li} | llama_cpp_lora vs hf_lora | {fmt(compare(lcl[li], refs[f'hf_lora.{li}']))} |")
                stats.append(f"| {fname} | {li} | dequant vs hf_base | {fmt(compare(deq[li], refs[f'hf_base.{li}']))} |")
            if cname == "llama" and fname == "f16":
                pat = llama_cpp_logits(path, ids_lines, lora_path=Path("/tmp/peft_cpp_patterns_by_llama_cpp.gguf"))
                for li in range(len(ids_lines)):
                    stats.append(f"| f16 + convert_lora_to_gguf(peft_lora_patterns) (not stored) | {li} | vs hf_lora_patterns | {fmt(compare(pat[li], refs[f'hf_lora_patterns.{li}']))} |")
            log("\n".join(stats[-4 * len(ids_lines):]))
        readme_stats[cname] = stats
        meta = dict(versions, tokens="../tokens.txt", dtype="float32 (computed in float64)",
                    layout="(tokens, vocab) row-major, one key per token line")
        save_safetensors(cdir / "reference.safetensors",
                         {k: v.astype(np.float32) for k, v in refs.items()}, meta)

    # --- quantize golden: one weight and llama-quantize's blocks for it
    _, t16 = gguf_tensors(out / "llama" / "f16.gguf")
    import gguf as _g
    tname = "blk.0.ffn_down.weight"
    t = t16[tname]
    gold = {"f32": _g.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            .reshape(int(t.shape[1]), int(t.shape[0]))}
    for fname, key in (("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_k", "q4_k"), ("q6_k", "q6_k")):
        _, tq = gguf_tensors(out / "llama" / f"{fname}.gguf")
        q = tq[tname]
        assert q.tensor_type.name.lower() == key, (q.tensor_type.name, key)
        gold[key] = np.frombuffer(np.ascontiguousarray(q.data).tobytes(), dtype=np.uint8).copy()
    save_safetensors(out / "quantize_golden.safetensors", gold, dict(
        versions, tensor=tname, source="llama/f16.gguf (f16 values, widened to f32)",
        rows=gold["f32"].shape[0], cols=gold["f32"].shape[1],
        quantizer="llama-quantize --pure <type>, no imatrix"))

    golden_checks = check_golden_with_ggml(bin_dir, gold)

    report = []
    if args.peft_cli:
        peft_cli_step(args, out, ll, ids_lines, report)

    shutil.rmtree(tok_dir)
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "README.md":
            file_sizes[str(p.relative_to(out))] = p.stat().st_size
    write_readme(out, versions, text_path, ids_lines, readme_stats, type_tables, file_sizes, report,
                 golden_checks)
    log(f"done in {time.time() - t0:.0f} s; total {sum(file_sizes.values()) / 1e6:.2f} MB")


def check_golden_with_ggml(bin_dir: Path, gold: dict) -> list[str]:
    """ggml itself (libggml-base's type traits) against the golden data and gguf-py."""
    import ctypes
    import gguf

    lib = ctypes.CDLL(str(bin_dir / "libggml-base.so"))

    class Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    x = gold["f32"]
    rows, cols = x.shape
    lines = []
    for key in ("q8_0", "q4_0", "q4_k", "q6_k"):
        qt = gguf.GGMLQuantizationType[key.upper()]
        tr = lib.ggml_get_type_traits(int(qt)).contents
        raw = gold[key]
        row_bytes = raw.size // rows
        deq = np.zeros(x.size, np.float32)
        fn(tr.to_float)(raw.ctypes.data, deq.ctypes.data, x.size)
        py = gguf.quants.dequantize(raw.reshape(rows, row_bytes), qt).reshape(-1)
        requant = np.zeros(raw.size, np.uint8)
        for r in range(rows):
            row = np.ascontiguousarray(x[r])
            fn(tr.from_float_ref)(row.ctypes.data, requant[r * row_bytes:].ctypes.data, cols)
        same_q = np.array_equal(requant, raw)
        same_d = np.array_equal(deq, py.astype(np.float32))
        assert same_q and same_d, (key, same_q, same_d)
        lines.append(f"- `{key}`: {row_bytes} bytes per row; ggml's `from_float_ref` "
                     f"(quantize_row_{tr.type_name.decode()}_ref) on `f32` gives these bytes exactly; ggml's `to_float` and "
                     f"gguf-py's `dequantize` of them agree bit for bit; max |dequant - f32| = "
                     f"{float(np.abs(deq - x.reshape(-1)).max()):.3e}")
        log(lines[-1])
    return lines


def write_readme(out, versions, text_path, ids_lines, stats, types, sizes, report, golden_checks):
    from gguf_readme import render  # noqa: E402  (scripts/llama_cpp/gguf_readme.py)

    (out / "README.md").write_text(render(versions, text_path, ids_lines, stats, types, sizes, report,
                                          CASES, TARGETS, golden_checks))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
