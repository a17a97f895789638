#!/usr/bin/env bash
# The GPU check, run in one call on a lent GPU machine (the device tool), from the repository root:
#   bash scripts/gpu_check.sh
# It installs what the machine's image lacks from wheels carried in .whl/ (made here by
# scripts/gpu_wheels.sh), runs the GPU tests, then the GPU benchmark, and prints a short table.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
python3 scripts/bench_gpu.py --steps 10
