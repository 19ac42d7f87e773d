#!/usr/bin/env python3
"""Loads every run of the fortunes example with transformers + PEFT and checks its loss.

    python3 examples/fortunes_check.py OUT_DIR      (OUT_DIR: the example's --out, fortunes_out)

For each run in OUT_DIR/results.json: the adapter directory loaded with
PeftModel.from_pretrained over OUT_DIR/base (full fine-tuning: the saved model directory with
AutoModelForCausalLM), the mean loss of OUT_DIR/check_tokens.txt computed by PyTorch, compared with
the loss the C++ example computed on the same rows after reloading what it saved. Needs torch,
transformers and peft (pip); the example itself does not.
"""
import json
import pathlib
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: fortunes_check.py OUT_DIR")
    out = pathlib.Path(sys.argv[1])
    results = json.loads((out / "results.json").read_text())
    rows = [[int(t) for t in line.split()] for line in (out / "check_tokens.txt").read_text().splitlines() if line.strip()]
    ids = torch.tensor(rows)
    worst = 0.0
    failed = 0
    for r in results["runs"]:
        path = out / r["dir"]
        if r["method"].startswith("full"):
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        else:
            base = AutoModelForCausalLM.from_pretrained(out / "base", torch_dtype=torch.float32)
            model = PeftModel.from_pretrained(base, path)
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        rel = abs(loss - r["check_loss"]) / abs(r["check_loss"])
        worst = max(worst, rel)
        ok = rel < 1e-4
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {r['dir']:<28} PyTorch+PEFT loss {loss:.6f}  peft-cpp {r['check_loss']:.6f}  rel. diff {rel:.1e}")
    print(f"{len(results['runs']) - failed} of {len(results['runs'])} runs give peft-cpp's loss in PyTorch + PEFT "
          f"(largest relative difference {worst:.1e})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
