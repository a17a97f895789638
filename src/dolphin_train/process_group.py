"""The process group's lifecycle, shared by training and the data commands (`preprocess`, `inspect`) under
torchrun or accelerate: which process is the main one, joining the group early enough for rank 0 to
prepare data first, and leaving it cleanly before the process exits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")

# Generous: the other ranks wait at the barrier for as long as rank 0 tokenizes (the SLURM script runs
# `preprocess` first to keep that out of the distributed job).
MAIN_FIRST_TIMEOUT_S = 3 * 3600


def world_size() -> int:
    """Processes started by the launcher (torchrun and accelerate set WORLD_SIZE; a plain run is 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints, logs and writes summaries."""
    return os.environ.get("RANK", "0") == "0"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine is running (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def join_process_group(device: str) -> None:
    """Set up the process group with PyTorch's defaults for the device (NCCL on GPUs, gloo on CPUs), before
    accelerate's state exists: that state must only be created later, by TrainingArguments, once DeepSpeed
    is configured; accelerate and DeepSpeed both reuse an initialised group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":  # NCCL collectives run on the current device: one GPU per rank
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=MAIN_FIRST_TIMEOUT_S)
    )


def on_main_process_first(work: Callable[[], T], device: str) -> T:
    """Rank 0 runs `work` while the other ranks wait at a barrier, then they run it too (for work that
    rank 0 caches, such as data preparation, so the others find it done)."""
    if world_size() == 1:
        return work()
    import torch.distributed as dist

    join_process_group(device)
    if dist.get_rank() == 0:
        result = work()
        dist.barrier()
        return result
    dist.barrier()
    return work()


@contextmanager
def leaving_the_process_group_at_the_end() -> Iterator[None]:
    """For every command that may join a process group (training, and preparing data under torchrun)."""
    finished = False
    try:
        yield
        finished = True
    finally:
        leave_process_group(finished)


def leave_process_group(finished: bool) -> None:
    """Each process leaves the process group explicitly before it exits. Without this, gloo's worker
    threads can still hold tensors while the interpreter shuts down, and the process dies with SIGABRT
    ("terminate called without an active exception") after a run that succeeded. The barrier keeps a
    fast rank from leaving while another is still in a collective; after a failure there is none, since
    the other ranks may never reach it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()
