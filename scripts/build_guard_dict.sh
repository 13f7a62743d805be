#!/usr/bin/env bash
# Rebuild the shipped "next word" dictionary for the built-in model: for the 10 concepts of
# sample_data/guard_prompts.jsonl, mean-difference direction chunks at all 31 layers, built on
# sample_data/train.txt with every label moved one token earlier (--step 1: the token *before* each word,
# whose state the word is sampled from), cosine thresholds calibrated so that at most 3% of the training
# negatives match (fp-budget:0.03), and a colour rule calibrated to 1% of the training tokens that precede
# no concept word (the build's third pass; rules read the per-layer hits, not it). It is what the guard demonstration reads (docs/rules.md, "A guard,
# measured"): `when C@2-19 -> suppress C@20-29 x0.5 now for 4`. The budget and the rule were chosen on the
# development prompts only.
set -euo pipefail
cd "$(dirname "$0")/.."
chunktui build --model smollm2-135m --corpus sample_data/train.txt \
  --words cheese,apple,bread,cake,chocolate,coffee,dog,pizza,snow,tea --step 1 \
  --method mean-difference --criterion fp-budget:0.03 --layers all \
  --out sample_data/smollm2-135m.next-word.chunks.safetensors --overwrite
