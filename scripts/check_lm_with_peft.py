#!/usr/bin/env python3
"""Runs a causal LM (+ optional PEFT adapter) with transformers and compares its logits with a file.

    python3 scripts/check_lm_with_peft.py MODEL_DIR ADAPTER_DIR TOKENS_FILE LOGITS.safetensors [--tol 1e-4]

MODEL_DIR is loaded with AutoModelForCausalLM (float32, sdpa attention); ADAPTER_DIR is applied with
PeftModel.from_pretrained (pass "-" for the base model alone). The lines of TOKENS_FILE (space-separated
token ids) are right-padded with id 0 to the longest line, with attention_mask 1 on real tokens and
position ids 0..len-1, as in tests/data/lm (see its README.md). The `logits` tensor of LOGITS.safetensors,
shape (lines, longest, vocab), is compared on the positions inside each sequence only. Prints the max
absolute and relative (max abs diff / max abs reference) difference; exits 1 if either is above --tol.

Used to check that adapters written by peft-cpp load in PEFT and give the same logits, e.g.

    python3 scripts/check_lm_with_peft.py tests/data/lm/llama /tmp/saved_lora \\
        tests/data/lm/llama/tokens.txt tests/data/lm/llama/adapters/lora.reference.safetensors
"""
import argparse
import sys
import warnings

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("adapter_dir", help='PEFT adapter directory, or "-" for none')
    ap.add_argument("tokens_file")
    ap.add_argument("logits_file")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with open(args.tokens_file) as f:
        lines = [[int(t) for t in line.split()] for line in f if line.strip()]
    n, t = len(lines), max(len(l) for l in lines)
    ids = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for b, line in enumerate(lines):
        ids[b, :len(line)] = torch.tensor(line)
        mask[b, :len(line)] = 1
    pos = torch.arange(t).unsqueeze(0).expand(n, t).contiguous()

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if args.adapter_dir != "-":
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter_dir)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()

    ref = load_file(args.logits_file)["logits"].float()
    if ref.shape != logits.shape:
        print(f"shape mismatch: model {tuple(logits.shape)}, file {tuple(ref.shape)}")
        sys.exit(1)
    keep = mask.bool()
    diff = (logits[keep] - ref[keep]).abs().max().item()
    rel = diff / max(ref[keep].abs().max().item(), 1e-30)
    ok = diff <= args.tol and rel <= args.tol
    print(f"max abs diff {diff:.3e}  relative {rel:.3e}  (tol {args.tol:g}, {int(keep.sum())} positions)  "
          f"{'ok' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
