"""The shape of a batch and the training schedule, derived from the config (and the training rows) before
the run starts, so the run overview, the scheduler, the progress bar and `dolphin-train plan` agree on the
batch and the number of steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from dolphin_train.config.schema import Config


@dataclass(frozen=True)
class BatchShape:
    micro_batch_size: int  # rows per process per forward pass
    gradient_accumulation_steps: int
    world_size: int
    sequence_len: int
    padded_to_sequence_len: bool

    @property
    def tokens_per_micro_batch(self) -> int:
        """Token positions of one forward pass on one process (at most): what activation memory scales with."""
        return self.micro_batch_size * self.sequence_len

    @property
    def rows_per_step(self) -> int:
        """The effective batch: rows per optimizer step, over every process and accumulation step."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """Token positions per optimizer step: exactly this many tokens when rows are padded to
        sequence_len, at most this many otherwise."""
        return self.rows_per_step * self.sequence_len

    def describe(self) -> str:
        bound = "" if self.padded_to_sequence_len else "up to "
        return f"{self.rows_per_step} rows x {self.sequence_len} = {bound}{self.tokens_per_step:,} tokens"


def batch_shape(cfg: Config, world_size: int) -> BatchShape:
    return BatchShape(cfg.micro_batch_size, cfg.gradient_accumulation_steps, world_size, cfg.sequence_len,
                      cfg.pad_to_sequence_len)  # fmt: skip


@dataclass(frozen=True)
class TrainingSchedule:
    batch: BatchShape
    rows: int  # training rows (packed rows when packing)
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_steps: int | None  # None: evaluate at each epoch end
    save_steps: int | None  # None: save at each epoch end

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    @property
    def world_size(self) -> int:
        return self.batch.world_size


def compute_schedule(cfg: Config, rows: int, world_size: int, has_eval: bool) -> TrainingSchedule:
    batch = batch_shape(cfg, world_size)
    micro_batches = math.ceil(rows / (batch.micro_batch_size * world_size))
    steps_per_epoch = max(1, math.ceil(micro_batches / batch.gradient_accumulation_steps))
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * total)
    eval_steps = None
    if has_eval:
        eval_steps = cfg.eval_steps or (max(1, steps_per_epoch // cfg.evals_per_epoch) if cfg.evals_per_epoch else None)
    save_steps = cfg.save_steps or (max(1, steps_per_epoch // cfg.saves_per_epoch) if cfg.saves_per_epoch else None)
    return TrainingSchedule(batch, rows, micro_batches, steps_per_epoch, total, warmup, eval_steps, save_steps)


# axolotl's defaults for the jagged schedule, and its lowest multiplier without `cosine_min_lr_ratio`.
DEFAULT_RESTART_WARMUP = 10
DEFAULT_RESTART_ANNEAL = 1
JAGGED_MIN_SCALE = 0.001


@dataclass(frozen=True)
class JaggedRestarts:
    """`jagged_restart_steps`: the learning rate multiplied by a factor that falls to `min_scale` at each
    restart, rises back over `warmup` steps after it and, from the first restart on, falls over `anneal` steps
    before the next one (axolotl's jagged schedule, same steps and values; `min_scale` is
    `cosine_min_lr_ratio`, or JAGGED_MIN_SCALE without one, as axolotl takes it)."""

    every: int
    warmup: int = DEFAULT_RESTART_WARMUP
    anneal: int = DEFAULT_RESTART_ANNEAL
    min_scale: float = JAGGED_MIN_SCALE

    def multiplier(self, step: int) -> float:
        """The factor on the configured schedule's learning rate for optimizer step `step` (0-based)."""
        if step < self.every - self.anneal:
            return 1.0  # the first cycle: the configured warmup only
        into_cycle = step % self.every
        if into_cycle < self.warmup:
            t = into_cycle / self.warmup
        elif into_cycle > self.every - self.anneal:
            t = min(1.0, (self.every - into_cycle) / self.anneal)
        else:
            t = 1.0
        return self.min_scale + (1 - self.min_scale) * t


def jagged_restarts(cfg: Config) -> JaggedRestarts | None:
    if not cfg.jagged_restart_steps:
        return None
    # `0` (or axolotl's `false`) means the default, as in axolotl; so does a `cosine_min_lr_ratio` of 0
    return JaggedRestarts(cfg.jagged_restart_steps, cfg.jagged_restart_warmup_steps or DEFAULT_RESTART_WARMUP,
                          cfg.jagged_restart_anneal_steps or DEFAULT_RESTART_ANNEAL,
                          cfg.cosine_min_lr_ratio or JAGGED_MIN_SCALE)  # fmt: skip


def cosine_then_constant_factor(step: int, warmup: int, total: int, min_ratio: float, constant_ratio: float) -> float:
    """The learning-rate multiplier of `cosine_constant_lr_ratio`: linear warmup, a half cosine from 1 down to
    `min_ratio` that ends at step `constant_ratio x total`, then `min_ratio` to the end (as axolotl's
    warmup-decay-constant schedule; when the decay would end inside the warmup, the minimum follows it)."""
    if step < warmup:
        return step / max(1, warmup)
    decay_end = int(total * constant_ratio)
    progress = min(1.0, (step - warmup) / max(1, decay_end - warmup)) if decay_end > warmup else 1.0
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_then_constant_schedule(
    optimizer: Any, total: int, warmup: int, min_ratio: float, constant_ratio: float
) -> Any:
    """`cosine_then_constant_factor` as a torch scheduler (what the Trainer steps and checkpoints)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, partial(cosine_then_constant_factor, warmup=warmup, total=total, min_ratio=min_ratio,
                                       constant_ratio=constant_ratio))  # fmt: skip
