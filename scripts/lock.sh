#!/usr/bin/env bash
# Re-resolve the lock: locks/cpu-py311.txt, every package that scripts/setup.sh installs (pyproject.toml's
# dependencies with the extras the tests and docs use, and locks/inputs.in), pinned with their hashes, for
# CPython 3.11 on x86-64 Linux. Then run `bash .ci/run` and commit the lock with the code that needs it.
#
#   bash scripts/lock.sh              keep every pin that still satisfies pyproject.toml (add what is new)
#   bash scripts/lock.sh --upgrade    the newest release of everything (what scripts/check_latest.sh tries)
#
# Why uv (`uv pip compile`) rather than pip-tools: the same requirements-file format with hashes, which pip
# can also install; a resolve in seconds; and `uv pip sync`, which installs exactly the lock (removing
# what it does not list), the whole set-up twice as fast as pip (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${LOCK_OUT:-locks/cpu-py311.txt}
EXTRAS=(--extra test --extra deepspeed --extra docs)
uv_bin() {  # the venv's uv (the locked one) when there is one, else a temporary install of the locked version
  if [ -x .venv/bin/uv ]; then echo .venv/bin/uv; return; fi
  local tool
  tool=$(mktemp -d)
  python3 -m venv "$tool" && "$tool/bin/pip" install -q "$(grep -E '^uv==' locks/inputs.in)" >&2
  echo "$tool/bin/uv"
}
UV=$(uv_bin)
# Existing pins are preferred unless --upgrade: the lock moves only where it must.
"$UV" pip compile pyproject.toml locks/inputs.in "${EXTRAS[@]}" --override locks/overrides.txt \
  --find-links "${TORCH_FIND_LINKS:-/opt/wheels}" --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --no-header --quiet "$@" -o "$OUT"
# pip installs uv first, by hash, from the same pin (scripts/setup.sh)
awk '/^uv==/{keep=1} keep && /^[a-z]/ && !/^uv==/{exit} keep' "$OUT" | grep -v '^ *#' > locks/uv.txt
echo "lock: $(grep -cE '^[a-z0-9]' "$OUT") packages in $OUT"
