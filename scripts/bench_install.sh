#!/usr/bin/env bash
# Time `bash scripts/setup.sh` on fresh clones of two revisions, one after the other, each with empty pip and
# uv caches (what a new machine has): e.g. the last commit installed by pip against the lock installed by uv.
#   bash scripts/bench_install.sh [OLD_REV [NEW_REV]]      (default: a8e1003, the last pip install, and HEAD)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
for rev in "${1:-a8e1003}" "${2:-HEAD}"; do
  dir=$(mktemp -d)
  git clone -q "$repo" "$dir/clone" && git -C "$dir/clone" checkout -q "$rev"
  start=$(date +%s.%N)
  (cd "$dir/clone" && PIP_CACHE_DIR="$dir/pip-cache" UV_CACHE_DIR="$dir/uv-cache" bash scripts/setup.sh > "$dir/log" 2>&1) \
    || { echo "$rev: setup.sh failed, see $dir/log" >&2; exit 1; }
  end=$(date +%s.%N)
  printf '%s: %.0f s\n' "$(git -C "$dir/clone" log -1 --format=%h)" "$(echo "$end - $start" | bc)"
  rm -rf "$dir"
done
