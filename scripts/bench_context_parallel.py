"""Memory per process of one training step (forward and backward) of the repository's tiny model on one packed
row of 32K tokens, with context parallelism over the processes launched (CP 1: a plain run; CP 2: torchrun
with 2 processes, each computing half the tokens, attention through the all-to-all). Reports each process's
peak resident memory growth during the step (the model, optimizer-free, and the batch already in memory)
and the step's time. Run on the CPU:
    python scripts/bench_context_parallel.py
    python -m torch.distributed.run --nproc_per_node 2 scripts/bench_context_parallel.py
Options: --tokens N (default 32768).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.model.attention import register_packed_attention
from dolphin_train.model.attention_kernels import sdpa_kernel
from dolphin_train.model.context_parallel import ContextGroup, ContextParallelKernel, sharded_sequence
from dolphin_train.train.collator import ChatCollator
from dolphin_train.train.context_parallel import cut_batch, shifted_labels

REPO = Path(__file__).resolve().parents[1]
BACKEND = "dolphin_bench_cp"


def packed_row(tokens: int) -> dict[str, list[int]]:
    """One row of conversations of 200 to 1,000 tokens (random ids), the first token of each untrained."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2000, (tokens,), generator=generator).tolist()
    positions: list[int] = []
    while len(positions) < tokens:
        positions += range(int(torch.randint(200, 1000, (1,), generator=generator)))
    positions = positions[:tokens]
    labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, positions, strict=True)]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        cp = ContextGroup(world, dist.get_rank(), dist.group.WORLD)
    register_packed_attention(BACKEND, ContextParallelKernel.around(sdpa_kernel()))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(REPO / "configs/tiny/model")
    config._attn_implementation = BACKEND
    model = AutoModelForCausalLM.from_config(config)
    batch = ChatCollator(pad_token_id=0, pad_to_multiple_of=1, boundaries=True)([packed_row(args.tokens)])
    trained = int(shifted_labels(batch["labels"]).ne(IGNORE_INDEX).sum())
    inputs = cut_batch(batch, cp, pad_token_id=0) if cp else batch
    before = resident_mib()
    start = time.perf_counter()
    if cp:
        with sharded_sequence(cp):
            loss = model(**inputs, num_items_in_batch=trained).loss
            loss.backward()
    else:
        model(**inputs, num_items_in_batch=trained).loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rank = cp.rank if cp else 0
    print(f"CP {world} rank {rank}: {inputs['input_ids'].shape[1]} of {args.tokens} tokens, peak resident memory "
          f"growth in the step {peak - before:.0f} MiB, step {seconds:.1f} s", flush=True)
    if cp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
