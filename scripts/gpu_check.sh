#!/usr/bin/env bash
# chunktui on a CUDA machine: the GPU-marked tests, then the load, streaming (generate vs stream),
# perturbation-overhead and app benchmarks in bfloat16 on cuda, printed as one table with peak VRAM.
#
#   bash scripts/gpu_check.sh                                   # the built-in model
#   bash scripts/gpu_check.sh --model meta-llama/Llama-3.1-8B-Instruct
#   bash scripts/gpu_check.sh --model meta-llama/Llama-3.1-70B-Instruct --device-map auto
#
# Arguments go to benchmarks/gpu_check.py (--device, --dtype, --tokens, --repeats, --json FILE).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
py=.venv/bin/python

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: PyTorch sees no CUDA GPU here ($("$py" -c 'import torch; print(torch.__version__)')):" \
       "the GPU tests will skip, and the benchmarks need --device cpu --dtype float32." >&2
  gpu=0
else
  gpu=1
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
fi

echo "== GPU-marked tests"
"$py" -m pytest -q -rs -m gpu tests

if [ "$gpu" = 1 ] || [[ " $* " == *" --device cpu "* ]]; then
  echo "== benchmarks"
  "$py" benchmarks/gpu_check.py "$@"
else
  echo "== benchmarks skipped: no CUDA (pass --device cpu --dtype float32 to run them on the CPU)" >&2
fi
