"""The training schedule, derived from the config and the prepared data before the run starts, so the
summary, the scheduler and the progress bar agree on the number of steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dolphin_train.config.schema import Config


@dataclass(frozen=True)
class TrainingSchedule:
    rows: int  # training rows (packed rows when packing)
    world_size: int
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_steps: int | None  # None: evaluate at each epoch end
    save_steps: int | None  # None: save at each epoch end

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def plan_schedule(cfg: Config, rows: int, world_size: int, has_eval: bool) -> TrainingSchedule:
    micro_batches = math.ceil(rows / (cfg.micro_batch_size * world_size))
    steps_per_epoch = max(1, math.ceil(micro_batches / cfg.gradient_accumulation_steps))
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * total)
    eval_steps = None
    if has_eval:
        eval_steps = cfg.eval_steps or (max(1, steps_per_epoch // cfg.evals_per_epoch) if cfg.evals_per_epoch else None)
    save_steps = cfg.save_steps or (max(1, steps_per_epoch // cfg.saves_per_epoch) if cfg.saves_per_epoch else None)
    return TrainingSchedule(rows, world_size, micro_batches, steps_per_epoch, total, warmup, eval_steps, save_steps)
