#!/usr/bin/env bash
# The GPU check, run in one call on a lent GPU machine (the device tool), from the repository root:
#   bash scripts/gpu_check.sh            (carry .whl, made here by scripts/gpu_wheels.sh)
# 1. installs what the machine's image lacks from the wheels in .whl/;
# 2. the GPU tests: attention backends against each conversation alone, the chunked loss under autocast,
#    activation offloading and Liger against the plain path, float8's loss curve against bf16
#    (tests/test_gpu.py); Liger with and without the fused LoRA MLP (which MLP runs, and the activations it
#    keeps against what the plan counts), compiled layers (inductor/Triton) over 20 lengths without a
#    recompilation, the compiled in-backward optimizer step, the throughput meter under CUDA's sync debug
#    mode, the peak memory from the start of training (tests/test_gpu_train_paths.py);
# 3. the memory plan against real `dolphin-train train` runs, the one-GPU targets each in a process capped
#    at the target card's memory (GPU_MEMORY_CASES picks them, see scripts/gpu_memory_check.py);
# 4. the throughput ladder (scripts/bench_gpu.py: each lever's share on the Llama-3.2-1B shape, then 8B);
# 5. the fused LoRA functions against peft on one Llama-3-8B QLoRA layer (scripts/bench_lora_kernels.py).
# Each stage has its own time limit (8 minutes in all by default) and the next one runs whatever happens;
# logs go to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/scripts:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, peft, datasets, pyarrow; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__, '| pyarrow', pyarrow.__version__)" \
  2>&1 | tee -a "$OUT/env.txt"
python3 -c "import importlib.util as u; print('liger-kernel', bool(u.find_spec('liger_kernel')), '| torchao', \
bool(u.find_spec('torchao')), '| flash-attn', bool(u.find_spec('flash_attn')))" 2>&1 | tee -a "$OUT/env.txt"

# Attention (issue 22), in the tests stage: tests/test_gpu.py runs our one attention entry point on the real
# kernels (PyTorch's varlen attention; flash-attn where a wheel of it is in .whl/, see gpu_wheels.sh): packed
# rows at micro batch 3 against each conversation alone, generation with the KV cache and left padding against
# SDPA (tests/test_gpu_paths_on_cpu.py runs the same code on the CPU with reference kernels).
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started))s"
}
stage tests "${GPU_TESTS_S:-160}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  tests/test_gpu_train_paths.py
stage memory "${GPU_MEMORY_S:-160}" python3 scripts/gpu_memory_check.py \
  --cases "${GPU_MEMORY_CASES:-8b-qlora-8gib,8b-full-1gpu,8b-qlora-16k}" --out "$OUT/memory.json" --timeout 120
tar czf "$OUT/train_logs.tgz" /tmp/dolphin-memory-check/*/train.log 2>/dev/null
stage bench "${GPU_BENCH_S:-110}" python3 scripts/bench_gpu.py --steps 6 --budget "${GPU_BENCH_BUDGET_S:-70}" \
  --root /tmp/dolphin-memory-check --out "$OUT/bench.json"
stage lora_kernels "${GPU_KERNELS_S:-40}" python3 scripts/bench_lora_kernels.py --tokens 4096 --qlora
echo "== summary"
grep -h "^|" "$OUT/memory.log" "$OUT/bench.log" "$OUT/lora_kernels.log" 2>/dev/null
