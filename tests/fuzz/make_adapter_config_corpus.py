#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_adapter_config (tests/fuzz/corpus/adapter_config/).

Each seed is adapter_config.json, a NUL byte, the JSON header of adapter_model.safetensors, a NUL
byte, then its tensor data (the fuzzer adds the header's length): one small PEFT checkpoint per
method and variant (two modules, "up" (6, 4) and "down" (4, 6), rank 1..3), in the
layout of the checkpoints under tests/data/peft (whose LoKr and (IA)^3 adapters are copied as they
are). Needs numpy. Run from anywhere: python3 tests/fuzz/make_adapter_config_corpus.py
"""
import json
import pathlib
import struct

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "corpus" / "adapter_config"
DATA = HERE.parent / "data" / "peft"
SHAPES = {"up": (6, 4), "down": (4, 6)}  # module -> (out, in)
DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32}
RNG = np.random.default_rng(0)


def safetensors(tensors, dtype="F32"):
    """Header, NUL, data. tensors: name -> ndarray (float, stored as `dtype`) or (ndarray, "I32")."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t, dt = t if isinstance(t, tuple) else (t, dtype)
        if dt == "BF16":
            raw = (np.asarray(t, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = np.asarray(t, DTYPES[dt]).astype(np.dtype(DTYPES[dt]).newbyteorder("<")).tobytes()
        header[name] = {"dtype": dt, "shape": list(np.shape(t)), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    return json.dumps(header, separators=(",", ":")).encode() + b"\0" + b"".join(blobs)


def split_safetensors(data):
    """A safetensors file as the fuzzer takes it: header, NUL, tensor data (no length)."""
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n].rstrip(b" ") + b"\0" + data[8 + n :]


def seed(name, config, tensors=None, dtype="F32", raw_weights=None):
    data = json.dumps(config, separators=(",", ":")).encode()
    if tensors is not None:
        data += b"\0" + safetensors(tensors, dtype)
    elif raw_weights is not None:
        data += b"\0" + split_safetensors(raw_weights)
    (OUT / name).write_bytes(data)


def rand(*shape):
    return RNG.standard_normal(shape).round(2)


def key(module, param):
    return f"base_model.model.{module}.{param}"


def lora_tensors(ranks, bias=False, dora=False):
    t = {}
    for m, (out, inn) in SHAPES.items():
        r = ranks[m]
        t[key(m, "lora_A.weight")] = rand(r, inn)
        t[key(m, "lora_B.weight")] = rand(out, r)
        if bias:
            t[key(m, "lora_B.bias")] = rand(out)
        if dora:
            t[key(m, "lora_magnitude_vector")] = np.abs(rand(out)) + 0.5
    return t


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    targets = ["up", "down"]
    lora = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": targets, "bias": "none"}
    seed("lora", lora, lora_tensors({"up": 2, "down": 2}))
    seed("lora_bf16", lora, lora_tensors({"up": 2, "down": 2}), dtype="BF16")
    seed("lora_f16_regex", {**lora, "target_modules": ".*(up|down)"}, lora_tensors({"up": 2, "down": 2}), dtype="F16")
    seed("lora_bias", {**lora, "lora_bias": True}, lora_tensors({"up": 2, "down": 2}, bias=True))
    seed("lora_patterns", {**lora, "use_rslora": True, "rank_pattern": {"down": 1}, "alpha_pattern": {"^d.*n": 3.5}},
         lora_tensors({"up": 2, "down": 1}))
    saved = lora_tensors({"up": 2, "down": 2})
    saved["base_model.model.head.weight"] = rand(3, 6)
    seed("lora_modules_to_save", {**lora, "modules_to_save": ["head"], "target_modules": "all-linear"}, saved)
    seed("dora", {**lora, "use_dora": True}, lora_tensors({"up": 2, "down": 2}, dora=True))
    seed("config_only", {**lora, "fan_in_fan_out": False, "lora_dropout": 0.1})

    ada = {}
    for m, (out, inn) in SHAPES.items():
        r = 2 if m == "down" else 3
        ada[key(m, "lora_A")] = rand(r, inn)
        ada[key(m, "lora_B")] = rand(out, r)
        ada[key(m, "lora_E")] = rand(r, 1)
    seed("adalora", {"peft_type": "ADALORA", "r": 3, "init_r": 3, "target_r": 2, "lora_alpha": 2, "total_step": 10,
                     "target_modules": targets, "rank_pattern": {"down.lora_E": [True, False, True]}}, ada)

    seed("ia3_regex", {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": "d.wn"},
         {key("up", "ia3_l"): rand(6, 1), key("down", "ia3_l"): rand(1, 6)})

    loha = {}
    for m, (out, inn) in SHAPES.items():
        for w in ("1", "2"):
            loha[key(m, f"hada_w{w}_a")] = rand(out, 2)
            loha[key(m, f"hada_w{w}_b")] = rand(2, inn)
    seed("loha", {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": targets}, loha)

    rl = {"base_model.randlora_A": rand(2, 1, 4), "base_model.randlora_B": rand(6, 2, 2)}
    for m in SHAPES:
        rl[key(m, "randlora_lambda")] = rand(2, 2)
        rl[key(m, "randlora_gamma")] = rand(2, 4)
    rl[key("up", "randlora_A")] = rl["base_model.randlora_A"]
    seed("randlora", {"peft_type": "RANDLORA", "r": 2, "randlora_alpha": 8, "save_projection": True,
                      "target_modules": targets}, rl)

    vera = {"base_model.vera_A": rand(2, 6), "base_model.vera_B": rand(6, 2)}
    for m, (out, _) in SHAPES.items():
        vera[key(m, "vera_lambda_b")] = rand(out)
        vera[key(m, "vera_lambda_d")] = rand(2)
    seed("vera", {"peft_type": "VERA", "r": 2, "d_initial": 0.1, "save_projection": True, "target_modules": targets},
         vera)

    # SHiRA, r = 1: K = out + in entries reaching the last row and column (shape from the indices).
    shira = {}
    for m, (out, inn) in SHAPES.items():
        cells = [(out - 1, 0), (0, inn - 1)] + [(i, j) for i in range(out) for j in range(inn)][1:]
        cells = list(dict.fromkeys(cells))[: out + inn]
        shira[key(m, "shira_weight")] = rand(len(cells))
        shira[key(m, "shira_indices")] = (np.array(cells, dtype=np.int32).T, "I32")
    shira_cfg = {"peft_type": "SHIRA", "r": 1, "mask_type": "random", "target_modules": targets}
    seed("shira", shira_cfg, shira)
    # The same with the base's shape given (fuzz_base_shape), and indices that leave it partly empty.
    small = {}
    for m in SHAPES:
        cells = [(0, 0), (1, 2), (3, 1), (2, 3), (0, 3), (3, 0), (1, 1), (2, 2), (0, 1), (1, 0)]
        small[key(m, "shira_weight")] = rand(len(cells))
        small[key(m, "shira_indices")] = (np.array(cells, dtype=np.int32).T, "I32")
    seed("shira_base_shape", {**shira_cfg, "fuzz_base_shape": [6, 6]}, small)

    # Regression seeds: inputs that once crashed the loader or hung it.
    # A zero-size tensor whose other dimensions multiply past 2^63 (signed overflow in the loader).
    (OUT / "regress_row_length_overflow").write_bytes(
        json.dumps({**lora, "target_modules": ["up"]}).encode() + b"\0" +
        b'{"base_model.model.up.lora_A.weight":{"dtype":"F32","shape":[0,4294967296,4294967296],'
        b'"data_offsets":[0,0]}}\0')
    # A rank_pattern key that takes std::regex's backtracking executor exponential time.
    seed("regress_regex_backtracking", {**lora, "rank_pattern": {"(.*)*(.*)*(.*)*(.*)*z": 1}})
    # Nesting past the depth limit (copying the document recursed once per level: a deep enough
    # file overflowed the stack; this one is only deep enough to be refused).
    (OUT / "regress_deep_nesting").write_bytes(b'{"peft_type":"LORA","x":' + b"[" * 200 + b"]" * 200 + b"}")

    for method in ("lokr", "ia3"):  # PEFT's own files, small as they are
        d = DATA / method / "adapter"
        cfg = json.loads((d / "adapter_config.json").read_text())
        seed(f"{method}_peft", cfg, raw_weights=(d / "adapter_model.safetensors").read_bytes())


if __name__ == "__main__":
    main()
