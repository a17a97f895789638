"""Expected time per trained token of a setting: how `plan` orders the changes that would make a run fit, and
how much slower it says each is than the fastest (docs/plan.md).

A model from the assumptions below, not a measurement: it compares settings of one model and one dataset,
so only its ratios are used. Time per optimizer step, per GPU, divided by the tokens that GPU trains:

- compute: the forward pass costs 2 FLOPs per parameter per token; the backward pass 4 when the weights
  train (the gradients of the inputs and of the weights) and 2 when they are frozen (an adapter's base: the
  inputs' gradients only); gradient checkpointing recomputes the forward pass of the checkpointed layers
  (every `gradient_checkpointing_layers`-th): 2 FLOPs per parameter per token, times their share. So full
  fine-tuning with checkpointing costs 8 where without it costs 6: a third more time. Attention's own FLOPs,
  the adapter's and the optimizer step on the GPU are left out (small next to these at the model sizes that
  need a plan), as are 4-bit layers' dequantisation and a smaller micro-batch's lower efficiency.
- parameter offload (ZeRO-3 `offload_param`, FSDP CPU offload): every micro-batch brings this GPU's share of
  the 16-bit weights from CPU memory twice (the forward pass; the backward pass, whose recomputation uses
  the same copy), over PCIe at PCIE_BYTES_PER_S.
- optimizer offload: every micro-batch sends this GPU's share of the 16-bit gradients to CPU memory (DeepSpeed
  accumulates them there); every optimizer step sends the updated 16-bit weights back (unless they live in
  CPU memory anyway) and runs Adam on the CPU, bound by memory bandwidth: it reads the float32 gradient,
  reads and writes the float32 weight and both moments, and writes the 16-bit copy (CPU_ADAM_BYTES_PER_PARAM),
  at CPU_MEMORY_BYTES_PER_S shared by the GPUs of one node.
- the copies and the CPU's step are counted as not overlapping the GPU's compute (DeepSpeed overlaps part
  of them): for offload the figures are upper bounds. Communication between GPUs (DDP, ZeRO, FSDP over
  NVLink) is left out, as overlapping the compute.
"""

from __future__ import annotations

from dolphin_train.config.schema import Config
from dolphin_train.plan.memory import MemoryEstimate

# Sustained bf16 matrix throughput of the GPU assumed: about 40% of an L40S's dense peak (362 TFLOP/s), half
# of an A100's (312). A faster GPU (an H100) loses more, in proportion, to the same copies.
GPU_FLOPS = 150e12
PCIE_BYTES_PER_S = 25e9  # PCIe 4.0 x16: 32 GB/s each way in theory, about 25 GB/s from pinned memory
CPU_MEMORY_BYTES_PER_S = 100e9  # what one server node's CPUs achieve of their memory bandwidth, all cores
CPU_ADAM_BYTES_PER_PARAM = 4 + 3 * 8 + 2  # float32 gradient read; weight, moments read and written; 16-bit copy
GPUS_PER_NODE = 8
HALF = 2  # bytes of a 16-bit weight or gradient


def forward_backward_flops_per_token(cfg: Config, parameters: int) -> float:
    backward = 2 if cfg.adapter else 4  # a frozen base passes the inputs' gradients only
    recompute = 2 / cfg.gradient_checkpointing_layers if cfg.checkpointing else 0.0
    return (2 + backward + recompute) * parameters


def seconds_per_token(cfg: Config, memory: MemoryEstimate, gpus: int) -> float:
    """Expected seconds per trained token on one GPU, by the model above (`cfg` with its micro-batch decided)."""
    params, sharding = memory.params, memory.sharding
    tokens = int(cfg.micro_batch_size) * cfg.sequence_len  # per micro-batch on this GPU (packed rows are full)
    micro_batches = cfg.gradient_accumulation_steps
    compute = micro_batches * tokens * forward_backward_flops_per_token(cfg, params.total) / GPU_FLOPS
    copied = 0.0  # bytes over this GPU's PCIe link per optimizer step
    cpu = 0.0
    if sharding.offload_params:
        copied += micro_batches * 2 * HALF * params.total / gpus
    if sharding.offload_optimizer:
        copied += micro_batches * HALF * params.trainable / gpus
        if not sharding.offload_params:
            copied += HALF * params.trainable / gpus
        on_this_node = params.trainable * min(gpus, GPUS_PER_NODE) / gpus
        cpu = on_this_node * CPU_ADAM_BYTES_PER_PARAM / CPU_MEMORY_BYTES_PER_S
    return (compute + copied / PCIE_BYTES_PER_S + cpu) / (micro_batches * tokens)
