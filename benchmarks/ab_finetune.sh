#!/usr/bin/env bash
# benchmarks/ab_finetune.sh — two builds of the `peft` tool on the same fine-tuning run, alternated
# (A, B, A, B, ...) so a shared machine's load falls on both alike: median step time of steps
# 2..N-1 (from the log's cumulative seconds), peak RSS, first and last loss of each run.
#
#   benchmarks/ab_finetune.sh OLD_PEFT NEW_PEFT MODEL_DIR TOKENS_FILE [BATCH] [ROUNDS] [METHOD]
#
# e.g. the 33.5 M Llama of benchmarks/compare_pytorch_llm.py (scripts/make_random_llama.py DIR
# --shape bench-33m) and a file of random token ids, one sequence per line. LoRA-family methods
# at rank 16, alpha 32, all linear layers, 10 steps, 2 threads.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 OLD_PEFT NEW_PEFT MODEL_DIR TOKENS_FILE [BATCH] [ROUNDS] [METHOD]" >&2
  exit 2
fi
a=$1 b=$2 model=$3 tokens=$4 batch=${5:-4} rounds=${6:-2} method=${7:-lora}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for ((round = 1; round <= rounds; ++round)); do
  for side in A B; do
    bin=$a
    [[ $side == B ]] && bin=$b
    /usr/bin/time -f "%M" -o "$work/rss" "$bin" finetune --model "$model" --tokens "$tokens" --method "$method" \
      --rank 16 --alpha 32 --targets all-linear --steps 10 --batch "$batch" --lr 1e-4 --threads 2 --seed 1 \
      --log "$work/log.csv" --out "$work/out" 2>/dev/null
    python3 - "$side" "$work/log.csv" "$work/rss" <<'PY'
import statistics, sys
side, log, rss = sys.argv[1:]
with open(log) as f:
    head = f.readline().strip().split(",")
    rows = [line.strip().split(",") for line in f if line.strip()]
si, li = head.index("seconds"), head.index("loss")
s = [float(r[si]) for r in rows]
steps = [s[i] - s[i - 1] for i in range(1, len(s))][1:]
kib = int(open(rss).read().split()[-1])
print(f"{side}: median step {statistics.median(steps) * 1000:.0f} ms, peak RSS {kib / 1024:.0f} MiB, "
      f"loss {rows[0][li]} -> {rows[-1][li]}")
PY
    rm -rf "$work/out"
  done
done
