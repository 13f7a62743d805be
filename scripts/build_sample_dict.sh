#!/usr/bin/env bash
# Rebuild the shipped sample dictionary for the built-in model (every concept of
# sample_data/concepts.txt at every layer), and evaluate it on the held-out text.
# cheesecake is split into several tokens by SmolLM2's tokenizer, so it is labelled
# in part-word mode (the trailing '*').
# n = 10 positives per template (the paper uses 5): on our held-out text it lifts the mean TP rate
# over all concepts from 0.56 to 0.72 at FP rates near 0.0002 (benchmarks/pa_fit.py).
set -euo pipefail
cd "$(dirname "$0")/.."
words=$(grep -v '^#' sample_data/concepts.txt | sed '/^$/d; s/^cheesecake$/cheesecake*/' | paste -sd, -)
chunktui build --model smollm2-135m --corpus sample_data/train.txt --words "$words" \
  --layers all --n 10 --criterion accuracy --seed 0 --context sentence \
  --out sample_data/smollm2-135m.chunks.safetensors
chunktui evaluate --model smollm2-135m --dict sample_data/smollm2-135m.chunks.safetensors \
  --corpus sample_data/heldout.txt --json "${EVAL_JSON:-/tmp/sample-dict-eval.json}"
