"""Renders tests/data/gguf/README.md for make_gguf_references.py."""
from __future__ import annotations


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def render(versions, text_path, ids_lines, stats, types, sizes, report, cases, targets,
           golden_checks=()) -> str:
    L = []
    w = L.append
    w("# GGUF reference data")
    w("")
    w("Written by `scripts/llama_cpp/make_gguf_references.py` (do not edit by hand); llama.cpp is")
    w("built by `scripts/llama_cpp/build.sh`. The C++ tests read these files and need neither")
    w("Python nor llama.cpp.")
    w("")
    w("```")
    w("scripts/llama_cpp/build.sh")
    w("python3 scripts/llama_cpp/make_gguf_references.py")
    w("python3 scripts/llama_cpp/make_gguf_references.py --peft-cli build/examples/peft --peft-cli-only  # optional")
    w("```")
    w("")
    w("## Versions")
    w("")
    for k, v in versions.items():
        w(f"- {k}: {v}")
    w("")
    w("llama.cpp is the copy vendored in the PyPI source package `llama-cpp-python` of that")
    w("version (CPU, Release, `-DGGML_NATIVE=ON`). Its logits come from the package's Python")
    w("binding (ctypes over the `libllama.so` built by build.sh) with `logits_all=True`, one fresh")
    w("context per token line, `n_threads=1`, `flash_attn=False`, and the KV cache in **f32**")
    w("(`type_k = type_v = GGML_TYPE_F32`; llama.cpp's default is f16). No BOS is added: the")
    w("token ids are fed as they are.")
    w("")
    w("## Files")
    w("")
    w("| file | size |")
    w("| --- | --- |")
    total = 0
    for k, v in sizes.items():
        w(f"| `{k}` | {_mb(v)} |")
        total += v
    w(f"| total | {_mb(total)} |")
    w("")
    w("About 17 MB, over the 15 MB aimed at: llama's f16.gguf and hf/model.safetensors (the same")
    w("weights twice, 2.7 MB each) are both needed. To save room qwen2 has only f16 + Q4_K_M")
    w("(Q8_0 and the `--pure` types are covered by llama; qwen2's Q4_K_M quantizes its tied")
    w("token_embd, which is also its output matrix).")
    w("")
    w("- `tokens.txt`: two lines of space-separated token ids (24, then 10), drawn at random")
    w("  (numpy `default_rng(20260415)`, ids in [2, 320)). Every `<key>.<line>` below is the")
    w("  logits of line `<line>` (0 or 1), shape (tokens, 320), float32, row-major.")
    w("- `<case>/hf/`: the transformers checkpoint (`config.json`, `model.safetensors` in float16,")
    w(f"  `tokenizer.json`, `tokenizer_config.json`). Tokenizer: a byte-level BPE of 320 entries")
    w(f"  (`<|bos|>` = 0, `<|endoftext|>` = 1, 256 bytes, 62 merges) trained with `tokenizers` on")
    w(f"  `{text_path}`. Weights: random (torch seed fixed), rounded to float16: linear")
    w("  N(0, 1/in_features), embeddings N(0, 1), norms 1 + 0.1 N(0, 1), biases 0.5 N(0, 1),")
    w("  `lm_head` N(0, 4/hidden) (logits have a standard deviation of about 2).")
    w("- `<case>/f16.gguf`: `convert_hf_to_gguf.py --outtype f16` of `hf/` (through")
    w("  `scripts/llama_cpp/convert_hf_to_gguf_wrapper.py`, which only makes the converter's")
    w("  pre-tokenizer check answer `gpt-2`: the converter refuses BPE tokenizers whose split of")
    w("  its check text it does not know, and ours is new). 2-D weights are F16 (exactly the")
    w("  checkpoint's values), norms and biases F32.")
    w("- `<case>/<q>.gguf`: `llama-quantize [--pure] f16.gguf <q>.gguf <TYPE> 1`, no imatrix")
    w("  (none is given; llama-quantize uses one only with `--imatrix`). `--pure` files have every")
    w("  2-D weight in that one type; `q4_k_m` is llama-quantize's default Q4_K_M mix (table below).")
    w("- `<case>/peft_lora/`: PEFT `save_pretrained` of a LoRA on `hf/` (float32): r 8,")
    w(f"  lora_alpha 16 (scale 2), no dropout, target_modules {sorted(targets)}; lora_A ~")
    w("  N(0, 1/in_features), lora_B ~ N(0, 0.05^2), so the adapter changes the logits a lot.")
    w("- `llama/peft_lora_patterns/`: the same kind of adapter with `use_rslora=True` (scale")
    w("  alpha/sqrt(r)), `rank_pattern` {model.layers.1.mlp.down_proj: 4}, `alpha_pattern`")
    w("  {model.layers.1.mlp.down_proj: 32, model.layers.0.self_attn.k_proj: 4}.")
    w("- `<case>/lora_by_llama_cpp.gguf`: `convert_lora_to_gguf.py --base hf --outtype f32` of")
    w("  `peft_lora/` (llama.cpp's own converter).")
    w("- `<case>/reference.safetensors` (float32, computed in float64):")
    w("  - `hf_base.<line>`: transformers, float64, the `hf/` weights.")
    w("  - `hf_lora.<line>`, `hf_lora_patterns.<line>` (llama only): transformers + PEFT, float64.")
    w("  - `dequant.<F>.<line>`: transformers in float64 with the weights of `<F>.gguf` dequantized")
    w("    by gguf-py (`gguf.quants.dequantize`), q/k rows un-permuted for llama (inverse of")
    w("    `LlamaModel.permute`). The exact-arithmetic target for a reader of `<F>.gguf`.")
    w("  - `dequant_lora.<F>.<line>` (quantized F only; for f16 it would equal `hf_lora`): the")
    w("    same plus `peft_lora/` (float64): the exact target for a quantized base + LoRA.")
    w("  - `llama_cpp.<F>.<line>`: llama.cpp's logits for `<F>.gguf`.")
    w("  - `llama_cpp_lora.<F>.<line>`: llama.cpp with `lora_by_llama_cpp.gguf` at scale 1.")
    w("  - `llama_cpp_our_lora.f16.<line>`, `llama_cpp_our_lora_patterns.f16.<line>` (llama, only")
    w("    when generated with `--peft-cli`): llama.cpp, f16 base, with the adapter that our")
    w("    `peft export --gguf` wrote for `peft_lora/` / `peft_lora_patterns/`.")
    w("- `quantize_golden.safetensors`: `f32` (256, 512) = `llama` `blk.0.ffn_down.weight` (the f16")
    w("  values of f16.gguf widened to f32: the input llama-quantize saw), and `q8_0`, `q4_0`,")
    w("  `q4_k`, `q6_k`: the raw block bytes (U8, 1-D) llama-quantize wrote for that tensor in the")
    w("  `--pure` files, rows in order (row r = bytes [r*row_bytes, (r+1)*row_bytes)). No imatrix.")
    w("")
    if golden_checks:
        w("Checked when generated, with ggml's own type traits (ctypes on libggml-base.so):")
        w("")
        for g in golden_checks:
            w(g)
        w("")
        w("So llama-quantize without an imatrix is exactly ggml's `quantize_row_*_ref`, row by row,")
        w("on the f32 values, and gguf-py's dequantization (used for every `dequant.*` key) is")
        w("exactly ggml's.")
        w("")
    w("## Tensor types")
    w("")
    for f, tt in types.items():
        counts = {}
        for _, t in tt.items():
            counts[t] = counts.get(t, 0) + 1
        w(f"- `{f}`: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        if f.endswith("q4_k_m.gguf"):
            for name, t in tt.items():
                w(f"  - `{name}`: {t}")
    w("")
    w("## llama.cpp against the references")
    w("")
    w("max|d| is the largest absolute logit difference (rel: divided by the reference's largest")
    w("|logit|), top-1 the share of positions whose argmax agrees, KL the mean over positions of")
    w("KL(reference || candidate). llama.cpp's CPU matmuls round activations (to f16 for F16")
    w("weights, to Q8_0/Q8_K for quantized ones), so llama.cpp is close to, not equal to, the")
    w("exact references; `dequant vs hf_base` is the quantization error alone. For the quantized")
    w("files llama.cpp's distance to `dequant` is about the same (1-2% of the largest logit) for")
    w("Q8_0 as for Q4_0 or Q4_K: it is llama.cpp's activation rounding, not the weights.")
    w("`f16 + convert_lora_to_gguf(peft_lora_patterns)` shows that llama.cpp's converter does not")
    w("carry rsLoRA or alpha_pattern (one alpha for the file, divided by each tensor's rank).")
    w("")
    for case, rows in stats.items():
        w(f"### {case}")
        w("")
        w("| file | line | comparison | result |")
        w("| --- | --- | --- | --- |")
        for r in rows:
            w(r)
        w("")
    if report:
        w("### our `peft export --gguf`")
        w("")
        for r in report:
            w(r)
        w("")
    return "\n".join(L) + "\n"
