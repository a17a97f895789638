"""Run control: which checkpoint to resume from, and stopping cleanly on a signal or a diverged loss."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointPart(TrainerCallback):
    """A callback whose own state a checkpoint must hold to continue the run (ReLoRA's merged weights).
    DolphinTrainer writes it with the model's files: before trainer_state.json, the file that makes a
    checkpoint count as complete, and before the Trainer deletes older checkpoints (`save_total_limit`), so a
    run killed while it is written leaves an incomplete checkpoint and the previous complete one."""

    def save_into_checkpoint(self, directory: str, model: Any, step: int) -> None:
        """Write this part's state into the checkpoint `directory` of optimizer step `step` (the files that
        `files_a_checkpoint_needs` names)."""
        raise NotImplementedError


RELORA_FILE = "relora_base.safetensors"  # ReLoRA's merged weights (train/relora.py), part of a checkpoint


def merged_restarts(global_step: int, restart_steps: int) -> int:
    """ReLoRA restarts done once `global_step` optimizer steps are complete: a restart runs at the start of
    step `k * restart_steps + 1`, so a checkpoint saved at a multiple of `restart_steps` predates it."""
    return max(0, (global_step - 1) // restart_steps)


def files_a_checkpoint_needs(cfg: Config | None, step: int) -> list[str]:
    """Beyond the Trainer's own files, what a run of this config needs in a checkpoint of step `step`: the
    ReLoRA merged weights once a restart has happened."""
    if cfg is None or not (cfg.relora and cfg.jagged_restart_steps):
        return []
    return [RELORA_FILE] if merged_restarts(step, cfg.jagged_restart_steps) > 0 else []


def checkpoint_is_complete(path: Path) -> bool:
    """transformers writes trainer_state.json last (after weights, optimizer, scheduler and RNG states, and
    our CheckpointParts): a checkpoint cut off mid-write lacks it, or holds a truncated one."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def missing_for_run(path: Path, cfg: Config | None) -> list[str]:
    """Files a complete checkpoint lacks that this config's run needs to continue from it (a checkpoint written
    without them: by an earlier version, or by a run with other settings)."""
    return [f for f in files_a_checkpoint_needs(cfg, checkpoint_step(path)) if not (path / f).exists()]


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a complete checkpoint was saved at."""
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["global_step"])


def latest_complete_checkpoint(output_dir: str | Path, cfg: Config | None = None) -> Path | None:
    """The newest checkpoint a run can continue from (with `cfg`, one holding what that run needs)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
        reverse=True,
    )
    for _, path in found:
        if not checkpoint_is_complete(path):
            log.warning("Skipping %s: incomplete (interrupted while it was written)", path)
        elif missing := missing_for_run(path, cfg):
            log.warning("Skipping %s: it lacks %s, which this run needs to continue", path, ", ".join(missing))
        else:
            return path
    return None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints cut off mid-write (a killed run) can never be resumed from; left in place they would count
    towards `save_total_limit`, which then deletes complete ones first. Removed before training starts."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    removed = []
    for path in sorted(p for p in out.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)):
        if not checkpoint_is_complete(path):
            log.warning("Removing %s: incomplete (interrupted while it was written), it cannot be resumed from", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def holds_training_state(path: Path) -> bool:
    """Whether a checkpoint can continue a run: transformers writes the random-number state (next to the
    optimizer and scheduler states) in every checkpoint except `save_only_model`'s weights-only ones."""
    return any(path.glob("rng_state*.pth"))


def refuse_weights_only(path: Path, value: object) -> None:
    """Resuming from a weights-only checkpoint would silently restart the optimizer (Adam's moments from
    zero, the learning rate at the start of its warmup) and the data order: refuse, saying what to do."""
    if not holds_training_state(path):
        raise DolphinError(
            f"resume_from_checkpoint: {value}: {path} holds the model weights only (save_only_model: true), "
            "without the optimizer, scheduler and random-number states a run continues from; start a new run "
            f"from these weights with base_model: {path}, or remove the checkpoint"
        )


def resolve_resume(cfg: Config) -> str | None:
    """The checkpoint `resume_from_checkpoint` names: a directory, or the latest complete one in `output_dir`
    for `true` (which requires one) and `auto` or `auto_resume_from_checkpoints` (which start fresh without
    one)."""
    value = cfg.resume_from_checkpoint
    if value is None and cfg.auto_resume_from_checkpoints:
        value = "auto"  # axolotl's spelling of the same thing
    if value is None:
        return None
    if value is True or value in ("auto", "true"):
        last = latest_complete_checkpoint(cfg.output_dir, cfg)
        if last is None and value == "auto":
            log.info("resume_from_checkpoint: auto: no checkpoint in %s, starting fresh", cfg.output_dir)
        elif last is None:
            raise DolphinError(f"resume_from_checkpoint: true, but {cfg.output_dir} holds no complete checkpoint")
        if last is not None:
            refuse_weights_only(last, value)
        return str(last) if last else None
    path = Path(str(value))
    if not path.is_dir():
        raise DolphinError(f"resume_from_checkpoint: {value} is not a directory")
    if not checkpoint_is_complete(path):
        raise DolphinError(f"resume_from_checkpoint: {value} is incomplete (no readable trainer_state.json)")
    if missing := missing_for_run(path, cfg):
        raise DolphinError(f"resume_from_checkpoint: {value} lacks {', '.join(missing)}, which this run needs to "
                           "continue from it (relora: the merged weights after its restarts); resume from another "
                           "checkpoint")  # fmt: skip
    refuse_weights_only(path, value)
    return str(path)


class StopOnSignal(TrainerCallback):
    """SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send before a kill): finish the current step,
    save a checkpoint, and end training. Every process stops at the same step (the flag is combined
    across processes), so a distributed run never waits on a rank that has already left."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        log.warning("Received %s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def _any_process_received(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            value = torch.tensor([1 if flag else 0], device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            flag = bool(value.item())
        return flag

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._any_process_received():
            self.received = self.received or signal.SIGTERM
            # Said by every process (a warning passes the other ranks' log filter): they stop together.
            log.warning("Stopping at step %d: saving a checkpoint", state.global_step)
            control.should_save = True
            control.should_training_stop = True
        return control


class StopOnNonFiniteLoss(TrainerCallback):
    """A NaN or infinite training loss (or gradient norm) stops the run with a message naming the step."""

    def __init__(self) -> None:
        self.bad_step: int | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        values = [(logs or {}).get(k) for k in ("loss", "grad_norm")]
        if any(v is not None and not math.isfinite(float(v)) for v in values):
            self.bad_step = state.global_step
            control.should_training_stop = True
        return control


class LossWatchdog(TrainerCallback):
    """`loss_watchdog_threshold`: a logged training loss above the threshold for `patience` logs in a row means
    learning has broken down (a diverging run rarely recovers); stop and name the step, like a NaN loss does."""

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold = threshold
        self.patience = patience
        self.high_in_a_row = 0
        self.bad_step: int | None = None
        self.last_loss: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        loss = (logs or {}).get("loss")
        if loss is None:
            return control
        self.high_in_a_row = self.high_in_a_row + 1 if float(loss) > self.threshold else 0
        if self.high_in_a_row >= self.patience:
            self.bad_step, self.last_loss = state.global_step, float(loss)
            control.should_training_stop = True
        return control


class EarlyStopping(TrainerCallback):
    """`early_stopping_patience`: stop when the evaluation loss has not improved on its best for `patience`
    evaluations in a row (transformers' EarlyStoppingCallback counts the same way, but needs the best model
    reloaded at the end; here the last weights stay, and the step of the best loss is named)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: float | None = None
        self.best_step = 0
        self.worse_in_a_row = 0
        self.stopped_step: int | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> Any:  # fmt: skip
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return control
        if self.best is None or float(loss) < self.best:
            self.best, self.best_step, self.worse_in_a_row = float(loss), state.global_step, 0
        else:
            self.worse_in_a_row += 1
        if self.worse_in_a_row >= self.patience:
            self.stopped_step = state.global_step
            control.should_training_stop = True
        return control
