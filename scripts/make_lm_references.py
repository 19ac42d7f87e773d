#!/usr/bin/env python3
"""Writes tests/data/lm: tiny random causal LMs, PEFT adapters on them, and reference outputs.

Not part of the test suite (it needs PyTorch, transformers and PEFT:
`pip install torch transformers peft safetensors`). Run from anywhere:

    python3 scripts/make_lm_references.py

It deletes and rewrites tests/data/lm (and nothing else). Deterministic: fixed seeds, one CPU
thread; re-running with the same library versions writes byte-identical files. See
tests/data/lm/README.md (written by this script) for the layout and the semantics of every tensor.

float64 references: transformers' models are not float64 throughout after `.double()`. The RMSNorm
classes cast to float32, the rotary embedding computes inv_freq and the angles in float32, eager
attention runs its softmax in float32 and the causal-LM loss calls `logits.float()`. For the
float64 references this script therefore (a) replaces the forward of every *RMSNorm module with the
same formula evaluated in the input dtype, (b) gives every *RotaryEmbedding module an inv_freq
computed in float64 (same formulas as transformers' default/linear/llama3 rope) and evaluates the
angles in float64, (c) uses the sdpa attention (which computes in the input dtype) and (d)
computes the cross-entropy itself from the float64 logits. A TorchDispatchMode then asserts that no
float32/float16/bfloat16 tensor is produced anywhere in the float64 forward and backward passes.
"""
import json
import math
import os
import shutil
import sys
import warnings

if os.environ.get("PYTHONHASHSEED") != "0":
    # PEFT writes sets (e.g. target_modules expanded from "all-linear") into adapter_config.json in
    # iteration order, which depends on string hashing: fix it so that re-runs are byte-identical
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import transformers
import peft
import safetensors
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)
from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, VeraConfig,
                  get_peft_model)
from peft.utils import get_peft_model_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("tests", "data", "lm")  # relative: base_model_name_or_path in adapter_config.json
LENGTHS = [7, 5, 7]
T = max(LENGTHS)
NEW_TOKENS = 6
TRAIN_STEPS = 4
MIN_GAP = 1e-2  # greedy decoding: smallest allowed top-1 minus top-2 logit gap (else try the next seed)
MIN_DISTINCT = 3  # and at least this many distinct tokens in each generated row (random nets like to repeat)


def good_generation(generated, gap):
    return gap >= MIN_GAP and min(len(set(row.tolist())) for row in generated) >= MIN_DISTINCT

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore")

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)


def model_llama():
    return LlamaForCausalLM(LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5))


def model_llama3_tied():
    return LlamaForCausalLM(LlamaConfig(
        **COMMON, head_dim=16, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}))


def model_llama_bias():
    return LlamaForCausalLM(LlamaConfig(
        **COMMON, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, attention_bias=True,
        mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}))


def model_mistral():
    return MistralForCausalLM(MistralConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False,
                                            rms_norm_eps=1e-5, sliding_window=4))


def model_qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6))


def model_qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False,
                                        rms_norm_eps=1e-6))


def model_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      activation_function="gelu_new", tie_word_embeddings=True, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None))


# name -> (constructor, seed, stored dtype, save_pretrained kwargs)
CASES = {
    "llama": (model_llama, 101, torch.float32, {}),
    "llama3_tied": (model_llama3_tied, 102, torch.float32, {}),
    "llama_bias": (model_llama_bias, 103, torch.float16, {}),
    "mistral": (model_mistral, 104, torch.float32, {"max_shard_size": "40KB"}),
    "qwen2": (model_qwen2, 105, torch.bfloat16, {}),
    "qwen3": (model_qwen3, 106, torch.float32, {}),
    "gpt2": (model_gpt2, 107, torch.float32, {}),
}

# ---------------------------------------------------------------------------------------------
# Adapters: name -> (config factory, std of the random adapter tensors)
# ---------------------------------------------------------------------------------------------
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {
    "llama": {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        "lora_all": lambda: LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                                       rank_pattern={"model.layers.1.mlp.down_proj": 2}, alpha_pattern={"o_proj": 3},
                                       lora_dropout=0.0),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=QKVO, use_dora=True, lora_dropout=0.0),
        "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "v_proj"], vera_dropout=0.0),
        "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], rank_dropout=0.0,
                                   module_dropout=0.0),
    },
    "llama3_tied": {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=["gate_proj", "up_proj"], rank_dropout=0.0,
                                   module_dropout=0.0),
    },
    "llama_bias": {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], lora_bias=True,
                                   lora_dropout=0.0),
    },
    "mistral": {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=QKVO, lora_dropout=0.0),
    },
    "qwen2": {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                                   lora_dropout=0.0),
    },
    "qwen3": {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0),
        "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                         target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0),
    },
    "gpt2": {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                   lora_dropout=0.0),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                   use_dora=True, lora_dropout=0.0),
    },
}

NOTES = {}  # findings collected while generating, written into the README


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def randomize_base(model, gen):
    """Norm weights 1 + 0.1 n, biases 0.1 n, token embeddings 0.5 n (tied: 0.1 n, else the last input token's
    own embedding dominates its logits and greedy decoding just repeats it), positions 0.3 n, other weights
    0.15 n."""
    emb_std = 0.1 if model.config.tie_word_embeddings else 0.5
    seen = set()
    with torch.no_grad():
        for mname, mod in model.named_modules():
            is_norm = "Norm" in type(mod).__name__
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                n = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if is_norm and pname == "weight":
                    v = 1.0 + 0.1 * n
                elif pname == "bias":
                    v = 0.1 * n
                elif isinstance(mod, torch.nn.Embedding):
                    v = (0.3 if mname.endswith("wpe") else emb_std) * n
                else:
                    v = 0.15 * n
                p.copy_(v)
    assert len(seen) == len(list(model.parameters()))


def read_tokens(path):
    with open(path) as f:
        return [[int(t) for t in line.split()] for line in f if line.strip()]


def make_batch(lines):
    ids = torch.zeros(len(lines), T, dtype=torch.long)
    mask = torch.zeros(len(lines), T, dtype=torch.long)
    for b, line in enumerate(lines):
        ids[b, :len(line)] = torch.tensor(line)
        mask[b, :len(line)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    pos = torch.arange(T).unsqueeze(0).expand(len(lines), T).contiguous()
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos), labels


def logits_of(model, batch):
    out = model(**batch).logits
    return out.masked_fill(batch["attention_mask"][..., None] == 0, 0.0)


def ce_loss(logits, labels):
    """transformers' ForCausalLMLoss (shift by one, ignore -100, mean over predicted tokens), in logits' dtype."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="mean")


def adamw_trajectory(m64, params, batch, labels, lr, weight_decay):
    """Losses before each of TRAIN_STEPS steps of torch's AdamW on the full batch (params trained in place)."""
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            foreach=False)
    losses = []
    for _ in range(TRAIN_STEPS):
        l = ce_loss(logits_of(m64, batch), labels)
        losses.append(l.detach())
        l.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def load_f32(case_dir, attn="sdpa"):
    m = AutoModelForCausalLM.from_pretrained(case_dir, dtype=torch.float32, attn_implementation=attn)
    return m.eval()


# --- float64 patches -------------------------------------------------------------------------
def inv_freq_f64(config):
    rp = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = rp["rope_type"]
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rp["factor"]
    if kind == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < hi_wl) * ~(wl > lo_wl)
        return torch.where(medium, smoothed, out)
    raise ValueError(kind)


def rmsnorm_forward_f64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def make_rotary_forward_f64(mod, inv):
    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mod.attention_scaling).to(x.dtype), (emb.sin() * mod.attention_scaling).to(x.dtype)
    return forward


def to_f64(model):
    """model.double() plus the patches described in the module docstring."""
    model = model.double()
    for _, mod in model.named_modules():
        name = type(mod).__name__
        if name.endswith("RMSNorm"):
            mod.forward = rmsnorm_forward_f64.__get__(mod)
        elif name.endswith("RotaryEmbedding"):
            assert mod.attention_scaling == 1.0
            inv = inv_freq_f64(mod.config)
            # same values as transformers' float32 buffer up to float32 rounding
            assert torch.allclose(inv.float(), mod.original_inv_freq.float(), rtol=1e-6, atol=0)
            mod.forward = make_rotary_forward_f64(mod, inv)
    return model.eval()


class NoLowPrecision(TorchDispatchMode):
    """Records every op that produces a floating-point tensor of less than 64 bits."""

    def __init__(self):
        super().__init__()
        self.bad = set()
        self.scalars = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
                # PEFT's LoHa/LoKr pass their scale as torch.tensor(python float), a float32 scalar; it does
                # not promote a float64 product, and is harmless when exactly representable (a dyadic number)
                if func is torch.ops.aten.lift_fresh.default and t.dim() == 0:
                    v = t.item()
                    if v == math.ldexp(round(math.ldexp(v, 20)), -20):
                        self.scalars.add(v)
                        continue
                self.bad.add(str(func))
        return out


def check_pure_f64(model, batch, labels, what):
    with NoLowPrecision() as mode:
        loss = ce_loss(logits_of(model, batch), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    assert not mode.bad, f"{what}: float64 model produced low-precision tensors in {sorted(mode.bad)}"


# --- generation ----------------------------------------------------------------------------------
def greedy(model, lines):
    """Explicit argmax loop without cache; checked against model.generate. Returns tokens, min top1-top2 gap."""
    rows, gap = [], float("inf")
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([line])
            for _ in range(NEW_TOKENS):
                last = model(input_ids=ids).logits[0, -1]
                top = last.topk(2).values
                gap = min(gap, (top[0] - top[1]).item())
                ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
            gen = model.generate(input_ids=torch.tensor([line]), attention_mask=torch.ones(1, len(line), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert torch.equal(gen[0], ids[0]), (gen, ids)
            rows.append(ids[0, len(line):])
    return torch.stack(rows), gap


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def make_base(case):
    ctor, seed, dtype, save_kwargs = CASES[case]
    d = os.path.join(OUT, case)
    os.makedirs(d)
    torch.manual_seed(seed)
    model = ctor()
    randomize_base(model, torch.Generator().manual_seed(seed))
    model = model.to(dtype)
    model.save_pretrained(d, **save_kwargs)
    os.remove(os.path.join(d, "generation_config.json"))
    stored = {n: p.detach().clone() for n, p in model.state_dict().items()}

    # reload: the stored dtype's rounding is part of every reference
    m32 = load_f32(d)
    for n, p in m32.state_dict().items():
        if n in stored:
            assert torch.equal(p, stored[n].float()), n

    vocab = model.config.vocab_size
    for attempt in range(200):
        gen = torch.Generator().manual_seed(seed + 1000 + attempt)
        lines = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in LENGTHS]
        generated, gap = greedy(m32, lines)
        if good_generation(generated, gap):
            break
    else:
        raise RuntimeError(f"{case}: no token seed gives a usable greedy continuation")
    NOTES.setdefault("seeds", []).append(f"{case} tokens {seed + 1000 + attempt}")
    with open(os.path.join(d, "tokens.txt"), "w") as f:
        f.write("".join(" ".join(map(str, l)) + "\n" for l in lines))
    batch, labels = make_batch(lines)
    with torch.no_grad():
        out = m32(**batch, labels=labels)
        logits = logits_of(m32, batch)
        loss = ce_loss(logits, labels)
    assert abs(loss.item() - out.loss.item()) < 1e-6, (loss, out.loss)

    m64 = to_f64(load_f32(d))
    check_pure_f64(m64, batch, labels, case)
    with torch.no_grad():
        logits64 = logits_of(m64, batch)
        loss64 = ce_loss(logits64, labels)
    ref = {"logits": logits, "logits_f64": logits64, "loss": loss.reshape(1), "loss_f64": loss64.reshape(1),
           "generated": generated}
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "reference.safetensors"))

    # how much transformers' own .double() (float32 norm/rope/softmax inside) differs from the pure float64 run
    with torch.no_grad():
        plain = logits_of(load_f32(d).double(), batch)
    NOTES.setdefault("f64", []).append(
        f"{case}: |f32 - f64| max {(logits.double() - logits64).abs().max().item():.1e}, "
        f"|unpatched .double() - f64| max {(plain - logits64).abs().max().item():.1e}")
    NOTES.setdefault("gap", []).append(f"{case}/base {gap:.3f}")
    print(f"{case:12s} loss {loss.item():.4f}  logit range ±{logits.abs().max().item():.2f}  gen gap {gap:.3f}")
    return d, lines, batch, labels, logits


def randomize_adapter(model, gen, method):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            n = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * n)  # PEFT initialises it to the row norms of the base weight
            elif method == "ia3":
                p.copy_(1.0 + 0.2 * n)
            elif method == "vera" and "vera_lambda_d" in name:
                p.copy_(1.0 + 0.3 * n)
            elif method == "vera":  # vera_lambda_b
                p.copy_(0.5 * n)
            elif method in ("loha", "lokr"):
                p.copy_(0.3 * n)
            elif method == "adalora":
                p.copy_(0.2 * n)
            else:  # lora, dora
                p.copy_(0.1 * n)


def saved_keys_of_trainable(model, saved_keys):
    """PEFT's saved name of every trainable parameter (matched by storage), checked against the file."""
    sd = get_peft_model_state_dict(model)
    by_ptr = {}
    for k, v in sd.items():
        by_ptr.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    names = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            ks = by_ptr.get((p.data_ptr(), tuple(p.shape)), [])
            assert len(ks) == 1, (n, ks)
            names[n] = ks[0]
    assert len(set(names.values())) == len(names)
    extra = sorted(set(saved_keys) - set(names.values()))
    assert set(names.values()) <= set(saved_keys), sorted(set(names.values()) - set(saved_keys))
    assert set(extra) <= {"base_model.vera_A", "base_model.vera_B"}, extra  # VeRA's frozen shared projections
    return names, extra


def make_adapter(case, aname, d, lines, batch, labels, base_logits, seed):
    method = aname if aname in ("vera", "ia3", "loha", "lokr", "adalora", "dora") else "lora"
    adir = os.path.join(d, "adapters", aname)
    for attempt in range(200):
        pm = get_peft_model(load_f32(d), ADAPTERS[case][aname]())
        randomize_adapter(pm, torch.Generator().manual_seed(seed + attempt), method)
        pm.eval()
        if good_generation(*greedy(pm, lines)):
            break
    else:
        raise RuntimeError(f"{case}/{aname}: no adapter seed gives a usable greedy continuation")
    NOTES.setdefault("seeds", []).append(f"{case}/{aname} {seed + attempt}")
    with torch.no_grad():
        before = logits_of(pm, batch)
    pm.save_pretrained(adir)
    for junk in ("README.md",):
        if os.path.exists(os.path.join(adir, junk)):
            os.remove(os.path.join(adir, junk))
    with open(os.path.join(adir, "adapter_config.json")) as f:
        acfg = json.load(f)
    for k in ("lora_dropout", "vera_dropout", "rank_dropout", "module_dropout"):
        assert acfg.get(k, 0.0) == 0.0, (k, acfg[k])
    with safe_open(os.path.join(adir, "adapter_model.safetensors"), "pt") as f:
        saved_keys = list(f.keys())

    # float32, loaded back
    m32 = PeftModel.from_pretrained(load_f32(d), adir, is_trainable=True).eval()
    with torch.no_grad():
        logits = logits_of(m32, batch)
        loss = ce_loss(logits, labels)
        if aname != "adalora":  # AdaLoraModel adds its orthogonal regulariser to outputs.loss
            hf_loss = m32(**batch, labels=labels).loss
            assert abs(loss.item() - hf_loss.item()) < 1e-6, (loss, hf_loss)
    assert torch.equal(logits, before), f"{case}/{aname}: reloaded adapter changes logits " \
        f"{(logits - before).abs().max().item()}"
    effect = (logits - base_logits).abs().max().item()
    assert effect > 1e-2, f"{case}/{aname}: adapter barely changes the logits ({effect})"
    generated, gap = greedy(m32, lines)

    # float64
    m64 = to_f64(PeftModel.from_pretrained(load_f32(d), adir, is_trainable=True))
    names, extra = saved_keys_of_trainable(m64, saved_keys)
    check_pure_f64(m64, batch, labels, f"{case}/{aname}")
    params = {n: p for n, p in m64.named_parameters() if p.requires_grad}
    assert set(params) == set(names)
    logits64 = logits_of(m64, batch)
    loss64 = ce_loss(logits64, labels)
    loss64.backward()
    ref = {"logits": logits, "logits_f64": logits64.detach(), "loss": loss.reshape(1),
           "loss_f64": loss64.detach().reshape(1), "generated": generated}
    for n, p in params.items():
        ref["grad." + names[n]] = p.grad.detach().clone()
    m64.zero_grad(set_to_none=True)

    losses = adamw_trajectory(m64, params, batch, labels, lr=1e-2, weight_decay=0.01)
    assert losses[0].item() == loss64.item()
    ref["train.losses"] = torch.stack(losses)
    for n, p in params.items():
        ref["train." + names[n]] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "adapters", aname + ".reference.safetensors"))

    NOTES.setdefault("keys", {})[f"{case}/{aname}"] = (sorted(saved_keys), extra)
    NOTES.setdefault("gap", []).append(f"{case}/{aname} {gap:.3f}")
    print(f"  {aname:9s} loss {loss.item():.4f}  max |logit change| {effect:.2f}  train {[round(x.item(), 4) for x in losses]}"
          f"  {len(names)} trainable tensors  gen gap {gap:.3f}")


FULL_CASES = ["llama3_tied", "qwen3", "gpt2"]  # full fine-tuning references (every parameter trainable)
FULL_LR = 1e-3


def make_multi(case="llama", adapters=("lora", "dora")):
    """PEFT's layout for several adapters in one directory: <case>/adapters/multi holds the first
    adapter as "default" and each other in a subfolder named after it (save_pretrained of a
    PeftModel holding them all); references: the single adapters' own files."""
    d = os.path.join(OUT, case)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d), os.path.join(d, "adapters", adapters[0]))
    for a in adapters[1:]:
        pm.load_adapter(os.path.join(d, "adapters", a), adapter_name=a)
    out = os.path.join(d, "adapters", "multi")
    pm.save_pretrained(out)
    for r, _, fs in os.walk(out):
        if "README.md" in fs:
            os.remove(os.path.join(r, "README.md"))


def make_full(case):
    """<case>/full.reference.safetensors: gradients and 4 AdamW steps with every parameter of the float64 model
    trainable (no adapter). Keys are the parameters' keys in model.safetensors; tied lm_head is not a separate
    parameter (named_parameters() lists the shared tensor once, under the embedding's name)."""
    d = os.path.join(OUT, case)
    batch, labels = make_batch(read_tokens(os.path.join(d, "tokens.txt")))
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    m64 = to_f64(load_f32(d))
    params = dict(m64.named_parameters())
    assert set(params) == file_keys, (sorted(set(params) ^ file_keys))
    for p in params.values():
        p.requires_grad_(True)
    check_pure_f64(m64, batch, labels, f"{case}/full")
    loss64 = ce_loss(logits_of(m64, batch), labels)
    ref_loss = load_file(os.path.join(d, "reference.safetensors"))["loss_f64"]
    assert loss64.item() == ref_loss.item(), (loss64.item(), ref_loss.item())
    loss64.backward()
    ref = {}
    for n, p in params.items():
        assert p.grad is not None and p.grad.abs().max().item() > 0, f"{case}/full: zero gradient for {n}"
        ref["grad." + n] = p.grad.detach().clone()
    m64.zero_grad(set_to_none=True)

    # exactly zero gradient rows: the last position of a line predicts nothing (and pads are ignored), so a
    # token or position contributes only through the lm_head unless it occurs before a line's last position
    lines = read_tokens(os.path.join(d, "tokens.txt"))
    emb = m64.get_input_embeddings().weight
    emb_name = next(n for n, p in params.items() if p is emb)
    zero_rows = lambda g: {i for i in range(g.shape[0]) if not g[i].any()}
    if m64.config.tie_word_embeddings:
        assert zero_rows(ref["grad." + emb_name]) == set()
    else:
        assert zero_rows(ref["grad." + emb_name]) == set(range(emb.shape[0])) - {t for l in lines for t in l[:-1]}
    if case == "gpt2":
        assert zero_rows(ref["grad.transformer.wpe.weight"]) == set(range(T - 1, m64.config.n_positions))
        # the key part of c_attn.bias adds q.b_k to every score of a query row: softmax-invariant, so its
        # gradient is zero up to rounding
        kb = max(ref[f"grad.transformer.h.{i}.attn.c_attn.bias"][32:64].abs().max().item() for i in range(2))
        qb = min(ref[f"grad.transformer.h.{i}.attn.c_attn.bias"][:32].abs().max().item() for i in range(2))
        assert kb < 1e-15 < 1e-3 < qb
        NOTES["full_kbias"] = kb

    if m64.config.tie_word_embeddings:
        # the tied tensor's gradient is the sum of its two uses: untie a fresh copy and compare
        u = to_f64(load_f32(d))
        uemb = u.get_input_embeddings()
        u.lm_head.weight = torch.nn.Parameter(u.lm_head.weight.detach().clone())
        assert u.lm_head.weight is not uemb.weight
        ce_loss(logits_of(u, batch), labels).backward()
        summed = uemb.weight.grad + u.lm_head.weight.grad
        assert (summed - ref["grad." + emb_name]).abs().max().item() < 1e-14
        NOTES.setdefault("full_tied", []).append(
            f"{case}: `grad.{emb_name}` = input-embedding part (max |.| {uemb.weight.grad.abs().max().item():.1e}) + "
            f"lm_head part (max |.| {u.lm_head.weight.grad.abs().max().item():.1e})")

    losses = adamw_trajectory(m64, params, batch, labels, lr=FULL_LR, weight_decay=0.0)
    assert losses[0].item() == loss64.item()
    if m64.config.tie_word_embeddings:
        assert m64.lm_head.weight is m64.get_input_embeddings().weight  # still tied after training
    ref["train.losses"] = torch.stack(losses)
    for n, p in params.items():
        ref["train." + n] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(d, "full.reference.safetensors"))
    NOTES.setdefault("full", []).append(f"{case} {len(params)}")
    print(f"  full      {len(params)} parameters  train {[round(x.item(), 4) for x in losses]}")


# ---------------------------------------------------------------------------------------------
# Findings for the README
# ---------------------------------------------------------------------------------------------
def sliding_window_pattern(d, lines):
    """Which (query i, key j) pairs attend in the installed transformers, from eager attention probabilities."""
    batch, _ = make_batch(lines)
    m = load_f32(d, attn="eager")
    with torch.no_grad():
        out = m(**batch, output_attentions=True)
        sdpa = logits_of(load_f32(d), batch)
    eager = out.logits.masked_fill(batch["attention_mask"][..., None] == 0, 0.0)
    assert (eager - sdpa).abs().max().item() < 1e-5
    w = m.config.sliding_window
    pairs = {}
    for b, n in enumerate(LENGTHS):
        for layer, att in enumerate(out.attentions):
            allowed = (att[b, :, :n, :] > 0).all(dim=0)  # (n, T), same for every head
            assert torch.equal(allowed, (att[b, :, :n, :] > 0).any(dim=0))
            pairs.setdefault(b, set()).add(tuple(map(tuple, allowed.int().tolist())))
    for b, n in enumerate(LENGTHS):
        assert len(pairs[b]) == 1
        grid = torch.tensor(next(iter(pairs[b])))
        i = torch.arange(n)[:, None]
        j = torch.arange(T)[None, :]
        rule = (j <= i) & (j > i - w)
        assert torch.equal(grid.bool(), rule), grid
    grid = torch.tensor(next(iter(pairs[0])))
    # without the window (same weights) the logits differ at positions >= w
    nowin = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, sliding_window=None).eval()
    with torch.no_grad():
        nw = logits_of(nowin, batch)
    diff_pos = [t for t in range(T) if (nw[0, t] - sdpa[0, t]).abs().max().item() > 1e-6]
    rows = "\n".join("    i=%d: %s" % (r, " ".join(str(v) for v in grid[r].tolist())) for r in range(LENGTHS[0]))
    return w, rows, diff_pos


README = """# tests/data/lm: tiny random causal LMs, PEFT adapters, reference outputs

Written by `scripts/make_lm_references.py` (do not edit by hand; this README is generated too).
Regenerate from the repository root with

    python3 scripts/make_lm_references.py

(CPU, one thread, well under a minute; deletes and rewrites tests/data/lm only). Fixed seeds: re-running
with the same versions writes byte-identical files.

`scripts/check_lm_with_peft.py MODEL_DIR ADAPTER_DIR|- TOKENS_FILE LOGITS.safetensors [--tol 1e-4]`
runs a model (+ PEFT adapter) with transformers on the padded token lines and compares with the
`logits` of a reference file, e.g. to check that an adapter written by peft-cpp loads in PEFT:

    python3 scripts/check_lm_with_peft.py tests/data/lm/llama /tmp/resaved_lora \\
        tests/data/lm/llama/tokens.txt tests/data/lm/llama/adapters/lora.reference.safetensors

Versions used: torch {torch}, transformers {transformers}, peft {peft}, safetensors {safetensors},
Python {python}.

## Layout

    <case>/config.json                     transformers config (as written by save_pretrained)
    <case>/model.safetensors               weights (mistral: model-0000k-of-0000n.safetensors +
                                           model.safetensors.index.json)
    <case>/tokens.txt                      3 lines of token ids, lengths 7, 5, 7
    <case>/reference.safetensors           base model references
    <case>/adapters/<name>/                PEFT save_pretrained directory (adapter_config.json,
                                           adapter_model.safetensors; PEFT's README.md model card removed)
    <case>/adapters/<name>.reference.safetensors   references with that adapter active (unmerged)
    llama/adapters/multi/                  PEFT's layout for several adapters: lora as "default" at the
                                           top, dora in multi/dora/ (save_pretrained of one PeftModel)
    <case>/full.reference.safetensors      full fine-tuning references ({full_cases} only)

Cases (all: vocab 96, hidden 32, 2 layers, 4 heads, max_position_embeddings 64):

| case | class | notes |
|---|---|---|
| llama | LlamaForCausalLM | intermediate 48, 2 kv heads, rope_theta 1e4, untied, rms_norm_eps 1e-5 |
| llama3_tied | LlamaForCausalLM | head_dim 16 (q/o dim 64 != hidden 32), llama3 rope (factor 8, low 1, high 4, original 16), theta 5e5, tied (no lm_head.weight in the file) |
| llama_bias | LlamaForCausalLM | attention_bias, mlp_bias, linear rope factor 2, stored float16 |
| mistral | MistralForCausalLM | sliding_window 4, sharded into {mistral_shards} files (max_shard_size 40KB) |
| qwen2 | Qwen2ForCausalLM | q/k/v bias, stored bfloat16, rms_norm_eps 1e-6 |
| qwen3 | Qwen3ForCausalLM | head_dim 16, q_norm/k_norm, rms_norm_eps 1e-6 |
| gpt2 | GPT2LMHeadModel | n_embd 32, n_inner 4*32, gelu_new, tied, all dropouts 0 |

Weights: the model's own init under torch.manual_seed(seed), then overwritten from a seeded
generator: norm weights 1 + 0.1 N(0,1), biases 0.1 N, token embeddings 0.5 N (tied: 0.1 N),
GPT-2 position embeddings 0.3 N, all other weights 0.15 N. Then cast to the stored dtype and saved;
bos/eos/pad_token_id are null in every config.

## Reference tensors

Inputs: the 3 lines of tokens.txt right-padded to length 7 with id 0, attention_mask 1 on real
tokens and 0 on pads, position_ids 0..6 on every row. Every model is loaded back from its
directory first (AutoModelForCausalLM, dtype float32, sdpa attention), so the stored dtype's
rounding (float16 / bfloat16 upcast exactly) is included.

- `logits` F32 (3, 7, 96): float32 model; rows past each sequence's end set to 0.
- `logits_f64` F64 (3, 7, 96): float64 model, same masking (see "float64" below).
- `loss` F32 (1,), `loss_f64` F64 (1,): causal-LM cross-entropy, labels = input_ids with pads
  -100, shifted by one inside (logit t predicts token t+1), mean over the 16 predicted tokens.
  Equal (checked, |diff| < 1e-6) to transformers' `model(..., labels=labels).loss`.
- `generated` I64 (3, 6): greedy continuation (6 new tokens) of each tokens.txt line alone,
  no padding, float32 model. Explicit argmax loop; checked identical to
  `model.generate(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)`.
  Every greedy step has a top-1 minus top-2 logit gap >= {min_gap}, so the tokens are robust to
  rounding, and every row has >= {min_distinct} distinct tokens (random nets like to repeat one
  token): the token seed, and for the adapters the adapter seed, is the first from a fixed start
  that satisfies both. Smallest gap: {gaps}.
  Seeds used: {seeds}.

Adapter references additionally (float64 model, adapter loaded with
`PeftModel.from_pretrained(base, dir, is_trainable=True)`):

- `grad.<key>` F64: d loss_f64 / d tensor for every trainable adapter tensor; `<key>` is the key
  of that tensor in adapter_model.safetensors (matched by storage and checked against the file).
- `train.losses` F64 (4,): losses before each of 4 steps of torch.optim.AdamW(lr 1e-2, betas
  (0.9, 0.999), eps 1e-8, weight_decay 0.01, foreach=False) on the full batch; losses[0] == loss_f64.
  torch's AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). Weight decay applies to every
  trainable tensor (also biases, DoRA magnitudes, VeRA lambdas, IA3 vectors).
- `train.<key>` F64: every trainable adapter tensor after the 4 steps.

Adapters (every trainable tensor randomised with a seeded generator after get_peft_model: LoRA /
DoRA 0.1 N; AdaLoRA 0.2 N; DoRA magnitude = PEFT's initial row norms * (1 + 0.1 N); LoHa / LoKr 0.3 N;
IA3 1 + 0.2 N; VeRA lambda_d 1 + 0.3 N, lambda_b 0.5 N; all dropouts 0, models in eval mode).
Each saved adapter was loaded back and gives bit-identical float32 logits to the in-memory one.

{adapter_table}

Full fine-tuning references, `<case>/full.reference.safetensors` ({full_cases}; no adapter, every
parameter of the float64 model trainable, same batch and loss as `loss_f64`):

- `grad.<name>` F64: d loss_f64 / d parameter for every parameter (not buffers); `<name>` is its key in
  the case's model.safetensors ({full_counts} tensors), e.g. `grad.model.layers.0.self_attn.q_proj.weight`,
  `grad.transformer.h.0.attn.c_attn.weight` (GPT-2 Conv1D: stored (in, out) layout). Tied models have no
  lm_head key: the embedding's gradient is the sum of both uses (checked against an untied copy:
  {full_tied}).
  Exactly zero rows: untied input embeddings (qwen3) of every token that does not occur before the last
  position of a tokens.txt line (the last position predicts nothing), GPT-2 `wpe` rows 6..63 (same reason).
  GPT-2's key third of `c_attn.bias` (entries 32..63) adds q.b_k to every score of a query row, which the
  softmax ignores: its gradient is 0 up to rounding (max |.| {full_kbias:.0e}), and AdamW (eps 1e-8) moves it
  by ~1e-12.
- `train.losses` F64 (4,): losses before each of 4 steps of torch.optim.AdamW(all parameters, lr {full_lr},
  betas (0.9, 0.999), eps 1e-8, weight_decay 0.0, foreach=False); losses[0] == loss_f64.
- `train.<name>` F64: every parameter after the 4 steps (tied embeddings stay one tensor).

## float64

transformers' models are not float64 throughout after `.double()`: the RMSNorm classes cast to
float32 and back, the rotary embedding computes inv_freq and the angles in float32, eager
attention does its softmax in float32, and ForCausalLMLoss calls `logits.float()`. So the
script patches the float64 model: RMSNorm in the input dtype, inv_freq and angles computed in
float64 (same formulas), sdpa attention, cross-entropy on the float64 logits. A TorchDispatchMode
asserts that no float32/16 tensor is produced in the float64 forward and backward passes
(the only exception allowed: PEFT's LoHa/LoKr scale, a float32 0-d torch.tensor(2.0), exact).
While writing the script the references were also checked out of band (those checks are not
committed): a from-scratch float64 implementation of the 7 architectures, with every adapter
merged into the weights by the formulas below, matched every `logits_f64` to <= 1e-14; central
finite differences of that implementation matched `grad.*` samples (LoRA, DoRA magnitude,
VeRA lambda_b, GPT-2 LoRA, AdaLoRA lora_E) to ~1e-9; a hand-written AdamW (formula above)
reproduced `train.*` to 4e-16. Size of the patches' effect (max abs over the logits):

{f64_notes}

## Findings (installed versions)

- Config keys: transformers {transformers} writes `rope_parameters` (containing `rope_theta`,
  `rope_type` and, for scaled rope, `factor`, `low_freq_factor`, `high_freq_factor`,
  `original_max_position_embeddings`) instead of `rope_theta` / `rope_scaling`; `rope_scaling=`
  given to the config constructor is converted. The dtype key is `dtype` (not `torch_dtype`).
  save_pretrained always writes safetensors (no safe_serialization argument any more).
  Example (llama3_tied): `"rope_parameters": {llama3_rope}`.
- llama3 rope with these numbers (head_dim 16, theta 5e5, original 16): wavelengths 2 pi /
  inv_freq are 6.28 (between high_freq_wavelen 4 and low_freq_wavelen 16: smoothed) and >= 32.4
  for the other 7 frequencies (divided by factor 8); no frequency stays unscaled.
- Mistral sliding window ({mistral_window}): query i attends key j iff j <= i and j > i - {mistral_window}
  (i.e. i-{mistral_window_minus_1}..i, {mistral_window} keys including itself). Measured from the eager attention
  probabilities (same in both layers, all heads; sdpa logits agree to < 1e-5); for sequence 0
  (rows i, columns j = 0..6):
{mistral_rows}
  Without the window the logits of sequence 0 differ at positions {mistral_diff}.
- GPT-2: the base model.safetensors keys have the `transformer.` prefix
  (`transformer.h.0.attn.c_attn.weight`, `transformer.wte.weight`, no lm_head.weight since tied);
  Conv1D weights are stored (in, out). The adapter keys are
  `base_model.model.transformer.h.<i>.attn.c_attn.lora_A.weight` etc. With fan_in_fan_out the
  LoRA tensors keep the usual shapes (lora_A (r, in), lora_B (out, r)). `c_proj` matches both
  `attn.c_proj` and `mlp.c_proj`.
- VeRA: one shared pair `base_model.vera_A` (r, max in_features) and `base_model.vera_B`
  (max out_features, r) over all targeted layers ({vera_shapes}); each layer uses
  vera_A[:, :in] and vera_B[:out, :]; they are saved (save_projection true) and are not trainable.
  vera_lambda_d (r,) and vera_lambda_b (out,) are per layer: out = base + lambda_b * (B (lambda_d * (A x))).
- AdaLoRA: {adalora_note}
- DoRA (PEFT): the norm ||W + s B A|| (row-wise, per output) is detached from the gradient
  (DoRA paper section 4.3), so grad.*lora_A/B differ from a fully differentiated norm; the output is
  base(x) + (m/||.|| - 1) (W x) + (m/||.||) s B A x, the bias not rescaled. Saved key
  `...lora_magnitude_vector` (no `.weight`).
- LoRA bias (llama_bias/lora, lora_bias true): `...lora_B.bias` (out,) is part of
  lora_B(lora_A(x)) and so is multiplied by the LoRA scale: out = base(x) + s (B A x + b_lora).
- rank_pattern / alpha_pattern (llama/lora_all): keys are matched as suffixes of module names;
  layer 1 down_proj gets r 2, every o_proj alpha 3; with use_rslora the scale is alpha / sqrt(r).
- Tied embeddings (llama3_tied, gpt2): "all-linear" does not target lm_head.
- "all-linear" is expanded when saving: adapter_config.json's target_modules is then a list of
  full module names (`model.layers.0.self_attn.q_proj`, ...), matched as name suffixes like any
  other list entry. PEFT writes that list in set-iteration order (hence PYTHONHASHSEED=0 here).
- IA3 (llama/ia3): `ia3_l` is (out, 1) for k_proj/v_proj (scales the output) and (1, in) for
  the feedforward module down_proj (scales the input). No `.weight` suffix.
- LoKr (llama3_tied/lokr, r 4 on 32 -> 48): lokr_w1 (6, 4), lokr_w2 (8, 8), delta =
  kron(w1, w2) * alpha / r; w2 is not decomposed into w2_a/w2_b because PEFT decomposes w2 only if r < max(w2 dims) / 2 (4 < 4 is false).
- LoHa (llama/loha): hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a, hada_w2_b; delta =
  (w1_a w1_b) * (w2_a w2_b) * alpha / r.
"""


def adapter_table():
    rows = ["| adapter | saved keys | saved, not trainable |", "|---|---|---|"]
    for name, (keys, extra) in NOTES["keys"].items():
        kinds = sorted({".".join(k.split(".")[-2:]) if k.endswith(".weight") or k.endswith(".bias")
                        else k.split(".")[-1] for k in keys})
        rows.append(f"| {name} | {len(keys)} ({', '.join(kinds)}) | {', '.join(extra) or '-'} |")
    return "\n".join(rows)


def main():
    os.chdir(ROOT)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    info = {}
    for ci, case in enumerate(CASES):
        d, lines, batch, labels, base_logits = make_base(case)
        info[case] = (d, lines)
        for ai, aname in enumerate(ADAPTERS[case]):
            make_adapter(case, aname, d, lines, batch, labels, base_logits, seed=10000 + 1000 * ci + 100 * ai)
    make_multi()
    for case in FULL_CASES:  # uses no random numbers; after everything else so nothing above can change
        make_full(case)

    w, rows, diff = sliding_window_pattern(*info["mistral"])
    shards = [f for f in os.listdir(os.path.join(OUT, "mistral")) if f.startswith("model-")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(OUT, "mistral", "model.safetensors.index.json"))
    with open(os.path.join(OUT, "llama3_tied", "config.json")) as f:
        rope = json.dumps(json.load(f)["rope_parameters"], sort_keys=True)
    vera = load_file(os.path.join(OUT, "llama", "adapters", "vera", "adapter_model.safetensors"))
    vera_shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(vera.items()) if "vera_A" in k or "vera_B" in k)
    vera_shapes += "; q_proj is 32x32, v_proj 16x32"
    text = README.format(
        torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
        safetensors=safetensors.__version__, python=sys.version.split()[0], mistral_shards=len(shards),
        gaps=", ".join(NOTES["gap"]), min_gap=MIN_GAP, min_distinct=MIN_DISTINCT, seeds=", ".join(NOTES["seeds"]), adapter_table=adapter_table(),
        f64_notes="\n".join("- " + s for s in NOTES["f64"]), llama3_rope=rope, mistral_window=w,
        mistral_window_minus_1=w - 1, mistral_rows=rows, mistral_diff=diff, vera_shapes=vera_shapes,
        adalora_note=ADALORA_NOTE, full_cases=", ".join(FULL_CASES), full_lr=FULL_LR,
        full_counts=", ".join(NOTES["full"]), full_tied="; ".join(NOTES["full_tied"]),
        full_kbias=NOTES["full_kbias"])
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


ADALORA_NOTE = """works: saved and loaded back without any training step (no
  update_and_allocate call, so `rank_pattern` stays null and every layer keeps init_r 4; the
  config's `"r": 8` is an unused default). Saved keys have no `.weight`:
  `...q_proj.lora_A` (r, in), `...lora_E` (r, 1), `...lora_B` (out, r). Forward:
  base(x) + (x @ (A * E)^T @ B^T) * lora_alpha / (ranknum + 1e-5), ranknum = r = 4 (a
  non-trainable parameter that is not saved), i.e. the scale is lora_alpha / (r + 1e-5), not
  exactly lora_alpha / r. PEFT's AdaLoraModel.forward adds
  orth_reg_weight (0.5) * mean over A and B matrices of ||P P^T - I||_F to outputs.loss whenever
  labels are passed; `loss`, the gradients and the training steps here are the plain cross-entropy
  (no orthogonal regulariser, no rank allocation)."""

if __name__ == "__main__":
    main()
