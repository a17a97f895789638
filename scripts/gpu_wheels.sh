#!/usr/bin/env bash
# Download, on the development machine, the pure-Python wheels that the GPU machine's image lacks
# (it has torch, transformers, accelerate, peft, numpy, pyyaml, rich, tiktoken, pytest), into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic pydantic-core annotated-types typing-inspection
ls .whl
