"""Throughput in the training logs: trained tokens per second over each logging interval and, on CUDA,
model FLOPs utilisation (MFU), on the console and in wandb alike. The Trainer adds these figures to each
training log itself (`DolphinTrainer.log`), before any callback reads the log."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from dolphin_train.model.adapters import parameter_count

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


def flops_per_token(model: Any, sequence_len: int) -> float:
    """6N + 12·L·d·T for full fine-tuning (N: parameters in matrix products, so the input embedding is
    left out unless tied to the output; L layers, d hidden size, T tokens attended); frozen weights
    cost 4N instead of 6N (no weight gradients)."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    trainable = frozen = 0
    for p in model.parameters():
        if p is embedding and not tied:
            continue
        if p.requires_grad:
            trainable += parameter_count(p)
        else:
            frozen += parameter_count(p)
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * sequence_len
    return 6 * trainable + 4 * frozen + attention


class ThroughputMeter(TrainerCallback):
    """Measures each logging interval. A callback only to learn when training starts (or resumes)."""

    def __init__(self, flops_per_token: float | None = None, peak: float | None = None, world_size: int = 1):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self._time = time.perf_counter()
        self._tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._time, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def figures(self, state: Any) -> dict[str, float]:
        """tokens_per_second (and mfu) since the previous training log."""
        now, tokens = time.perf_counter(), state.num_input_tokens_seen  # tokens: all processes, no padding
        seconds, new_tokens = now - self._time, tokens - self._tokens
        self._time, self._tokens = now, tokens
        if seconds <= 0 or new_tokens <= 0:
            return {}
        found: dict[str, float] = {"tokens_per_second": round(new_tokens / seconds)}
        if self.flops_per_token and self.peak:
            found["mfu"] = round(new_tokens * self.flops_per_token / seconds / (self.peak * self.world_size), 4)
        return found
