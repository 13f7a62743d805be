#!/usr/bin/env bash
# One-time set-up of .venv for chunktui; a no-op when nothing changed.
# PyTorch: the CUDA build on a machine with an NVIDIA GPU, the CPU build
# everywhere else (never the multi-GB CUDA packages on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${CHUNKTUI_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

"$PY" - <<'PYCHECK' || { echo "chunktui needs Python >= 3.10 (found $("$PY" --version 2>&1))" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYCHECK

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda
else
  flavour=cpu
fi
stamp=".venv/.chunktui-setup"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) torch-$TORCH_VERSION-$flavour"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "chunktui: setting up .venv (torch $TORCH_VERSION, $flavour build); this happens once" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if [ "$flavour" = cuda ]; then
  # PyPI's Linux wheels of torch are the CUDA builds
  "${pip[@]}" install "torch==$TORCH_VERSION"
else
  # a local CPU wheel if the machine has one (pip's find-links), else PyTorch's CPU index
  "${pip[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || "${pip[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
    || "${pip[@]}" install "torch==$TORCH_VERSION"  # macOS: PyPI's wheel is the CPU/MPS build
fi
"${pip[@]}" install -e ".[dev]"
echo "$want" > "$stamp"
