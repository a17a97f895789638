#!/usr/bin/env bash
# Upstream breakage found on purpose: resolve the newest releases of everything pyproject.toml allows
# (ignoring the lock), install them into .venv-latest/ and run the test suite there. Nothing in the
# repository changes; when it passes, `bash scripts/lock.sh --upgrade` moves the lock to those versions.
#   bash scripts/check_latest.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/uv ] || bash scripts/setup.sh
LATEST=$(mktemp --suffix=.txt)
LOCK_OUT=$LATEST bash scripts/lock.sh --upgrade
git checkout --quiet -- locks/uv.txt 2>/dev/null || true  # lock.sh rewrote it from the upgraded lock
echo "newer than the lock:"
diff <(grep -E '^[a-z0-9]' locks/cpu-py311.txt | cut -d' ' -f1) <(grep -E '^[a-z0-9]' "$LATEST" | cut -d' ' -f1) \
  | sed -n 's/^> /  /p' || true
[ -x .venv-latest/bin/python ] || python3 -m venv .venv-latest
FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
.venv/bin/uv pip sync --quiet --python .venv-latest/bin/python --require-hashes --compile-bytecode --find-links "$FIND_LINKS" "$LATEST"
.venv/bin/uv pip install --quiet --python .venv-latest/bin/python --no-deps --no-build-isolation -e .
.venv-latest/bin/python -m pytest "$@"
