"""Throughput in the training logs: trained tokens per second over each logging interval and, on CUDA,
model FLOPs utilisation (MFU) and, where checkpointing recomputes, hardware FLOPs utilisation (HFU), on
the console and in wandb alike. The Trainer counts each micro-batch's FLOPs before running it and adds
these figures to each training log itself (`DolphinTrainer.log`), before any callback reads the log.

FLOPs are counted from what each batch really holds (docs/training.md, "Throughput"):
- dense: 6 per trained parameter and 4 per frozen one (forward, and the gradient of the activations;
  weight gradients only for trained weights), per non-padding token; the input embedding is a lookup;
- attention: each conversation of n tokens attends causally, n²/2 query-key pairs per layer, 4·d FLOPs
  each forward (scores and weighted values, d = heads x head dimension), 3 times that with the backward:
  6·L·d·n² per conversation, so a packed row of short conversations costs far less than one long one;
- recomputation (checkpointing) is hardware work, not model work: one more forward of every checkpointed
  layer, counted in HFU only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.model.adapters import parameter_count
from dolphin_train.model.layers import decoder_layers

log = logging.getLogger(__name__)

# Dense bf16 peak of common training GPUs, in FLOP/s (vendor figures, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


@dataclass(frozen=True)
class ModelFlops:
    """The model's shape as FLOP counting needs it."""

    trained: int  # parameters in matrix products that train
    frozen: int  # parameters in matrix products that do not
    layer_params: int  # parameters of all decoder layers (recomputed under checkpointing)
    layers: int
    attention_width: int  # query heads x head dimension
    checkpointed_layers: int = 0

    def of_batch(self, tokens: int, sum_of_squares: int) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of one micro-batch: `tokens` non-padding tokens, `sum_of_squares`
        the sum over its conversations of their length squared."""
        dense = (6 * self.trained + 4 * self.frozen) * tokens
        attention = 6 * self.layers * self.attention_width * sum_of_squares
        share = self.checkpointed_layers / max(1, self.layers)
        recompute = share * (2 * self.layer_params * tokens + 2 * self.layers * self.attention_width * sum_of_squares)
        return dense + attention, dense + attention + recompute


def model_flops(model: Any, checkpointed_layers: int = 0) -> ModelFlops:
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding
    trained = frozen = 0
    for p in model.parameters():
        if p is embedding and not tied:
            continue  # a lookup, no matrix product
        if p.requires_grad:
            trained += parameter_count(p)
        else:
            frozen += parameter_count(p)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = decoder_layers(model)
    layer_params = sum(parameter_count(p) for p in layers.parameters())
    return ModelFlops(trained, frozen, layer_params, len(layers), heads * head_dim, checkpointed_layers)


def conversation_lengths(position_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(non-padding tokens, sum of each conversation's length squared) of a batch, as 0-dim tensors on the
    batch's device: computed there with fixed-size operations, so no value is read back (on a GPU a read waits
    for all queued work). Conversations start where the position ids restart; a segment with no trained token is
    padding (every real conversation has one: rows without are dropped when the data is prepared)."""
    flat = position_ids.reshape(-1)
    trained = (labels.reshape(-1) != IGNORE_INDEX).long()
    row_len = position_ids.shape[-1]
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::row_len] = True
    segment = torch.cumsum(starts, 0) - 1
    # At most one segment per token: per-segment sums in a tensor of the batch's size (bincount would size its
    # output from the largest segment id, a value read from the device).
    lengths = torch.zeros_like(segment).scatter_add_(0, segment, torch.ones_like(segment))
    real = torch.zeros_like(segment).scatter_add_(0, segment, trained) > 0
    kept = torch.where(real, lengths, torch.zeros_like(lengths))
    return kept.sum(), (kept * kept).sum()


class ThroughputMeter(TrainerCallback):
    """Measures each logging interval. A callback only to learn when training starts (or resumes).

    It counts the tokens itself (transformers' own count, `include_num_input_tokens_seen`, reads each micro
    batch's count back from the GPU, waiting for it): each micro batch's tokens and squared conversation lengths
    are summed where the batch is, and read once per log."""

    def __init__(
        self, flops: ModelFlops | None = None, peak: float | None = None, world_size: int = 1, compiled: bool = False,
        shared_by: int = 1,
    ):
        self.flops = flops
        self.shared_by = shared_by  # processes that count each batch (a context-parallel group), counted once
        self.peak = peak
        self.world_size = world_size
        self.compiled = compiled  # the first step compiles: timed apart, left out of the throughput
        self.first_step_seconds: float | None = None
        self._first_step = 0
        self._time = time.perf_counter()
        self._counted: torch.Tensor | None = None  # [tokens, sum of squared lengths] since the last log

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._time, self._counted = time.perf_counter(), None
        self._first_step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.compiled and self.first_step_seconds is None and state.global_step == self._first_step + 1:
            self.first_step_seconds = time.perf_counter() - self._time
            if state.is_world_process_zero:
                log.info("First step, with torch.compile's compilation: %.1f s (left out of tokens/s and MFU)",
                         self.first_step_seconds)  # fmt: skip
            self._time, self._counted = time.perf_counter(), None

    def count_batch(self, inputs: dict[str, Any]) -> None:
        """This process's micro-batch, before it runs: its tokens and squared conversation lengths added up on
        the batch's device (the GPU on CUDA), never read back here (see `counted_since_last_log`)."""
        if "position_ids" not in inputs:
            return
        tokens, squares = conversation_lengths(inputs["position_ids"], inputs["labels"])
        counted = torch.stack([tokens, squares])
        self._counted = counted if self._counted is None else self._counted + counted.to(self._counted.device)

    def counted_since_last_log(self) -> tuple[int, int]:
        """(tokens, sum of squared conversation lengths) of the micro-batches counted since the last call,
        summed over the processes: the one read of the counts from the device."""
        import torch.distributed as dist

        counted = self._counted if self._counted is not None else torch.zeros(2, dtype=torch.long)
        self._counted = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                counted = counted.cuda()
            dist.all_reduce(counted)
        tokens, squares = counted.tolist()
        return tokens, squares

    def figures(self, state: Any) -> dict[str, float]:
        """tokens_per_second (and mfu, hfu) since the previous training log. Every process calls this at each
        training log (the counts are summed over them). FLOPs are linear in the token and squared-length
        sums, so the sums of all micro batches give their FLOPs."""
        now = time.perf_counter()
        seconds, self._time = now - self._time, now
        tokens, squares = self.counted_since_last_log()
        # every process of a context-parallel group counts the group's whole batch: counted once
        tokens, squares = tokens // self.shared_by, squares // self.shared_by
        if seconds <= 0 or tokens <= 0:
            return {}
        found: dict[str, float] = {"tokens_per_second": round(tokens / seconds)}
        if self.flops and self.peak:
            model, hardware = self.flops.of_batch(tokens, squares)
            found["mfu"] = round(model / seconds / (self.peak * self.world_size), 4)
            if hardware > model:
                found["hfu"] = round(hardware / seconds / (self.peak * self.world_size), 4)
        return found
