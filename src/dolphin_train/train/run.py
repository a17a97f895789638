"""The training run: every stage of the flow, in order, then transformers.Trainer does the loop."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from dolphin_train.config.resolve import RuntimeSettings, is_main_process, resolve_runtime, resolved_settings
from dolphin_train.config.schema import Config
from dolphin_train.data.packing import PackedRows, PackingPlan, PaddedToEvenShards, SingleRows, plan_packing
from dolphin_train.data.prepare import PreparedData, prepare_data
from dolphin_train.errors import DolphinError
from dolphin_train.model.tokenizer import LoadedTokenizer, load_tokenizer
from dolphin_train.train.arguments import check_trackers, use_liger
from dolphin_train.train.control import (
    LossWatchdog,
    StopOnNonFiniteLoss,
    StopOnSignal,
    checkpoint_is_complete,
    latest_complete_checkpoint,
)
from dolphin_train.train.records import (
    RecordConfigInTrackers,
    memory_before_model_mb,
    run_identity,
    save_config_snapshot,
    write_run_summary,
)
from dolphin_train.train.schedule import TrainingSchedule, plan_schedule

log = logging.getLogger(__name__)

PREPARE_TIMEOUT_S = 3 * 3600


@dataclass(frozen=True)
class TrainingRows:
    """The rows the Trainer iterates, and how they were packed (None when not packed)."""

    train: Any
    eval: Any | None
    train_plan: PackingPlan | None
    eval_plan: PackingPlan | None


def build_rows(cfg: Config, prepared: PreparedData) -> TrainingRows:
    def rows(dataset: Any, packed: bool, seed: int) -> tuple[Any, PackingPlan | None]:
        if dataset is None:
            return None, None
        if not packed:
            return SingleRows(dataset), None
        plan = plan_packing(_lengths(dataset), cfg.sequence_len, seed, progress=is_main_process())
        return PackedRows(dataset, plan), plan

    train, train_plan = rows(prepared.train, cfg.sample_packing, cfg.seed)
    eval_rows, eval_plan = rows(prepared.eval, cfg.eval_packing, cfg.seed + 1)
    return TrainingRows(train, eval_rows, train_plan, eval_plan)


def _lengths(dataset: Any) -> Any:
    import numpy as np

    return np.asarray(dataset["length"], dtype=np.int64)


def prepare_on_main_process_first(cfg: Config, tok: LoadedTokenizer, runtime: RuntimeSettings) -> PreparedData:
    """Rank 0 prepares and caches; the other ranks wait at a barrier, then load the same cache entry.

    The process group is set up here with PyTorch's defaults for the device (NCCL on GPUs, gloo on CPUs)
    rather than through accelerate's state, which must only be created later, by TrainingArguments,
    once DeepSpeed is configured; accelerate and DeepSpeed both reuse an initialised group."""
    import torch.distributed as dist

    if runtime.world_size == 1:
        return prepare_data(cfg, tok.tokenizer)
    if not dist.is_initialized():
        if runtime.device == "cuda":  # NCCL collectives run on the current device: one GPU per rank
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Generous: the other ranks wait at the barrier for as long as rank 0 tokenizes (the SLURM script
        # runs `preprocess` first to keep that out of the distributed job).
        dist.init_process_group(
            backend="nccl" if runtime.device == "cuda" else "gloo", timeout=timedelta(seconds=PREPARE_TIMEOUT_S)
        )
    if dist.get_rank() == 0:
        prepared = prepare_data(cfg, tok.tokenizer)
        dist.barrier()
        return prepared
    dist.barrier()
    return prepare_data(cfg, tok.tokenizer)


def resolve_resume(cfg: Config) -> str | None:
    value = cfg.resume_from_checkpoint
    if value is None and cfg.auto_resume_from_checkpoints:
        value = "auto"
    if value is None:
        return None
    if value is True or value in ("auto", "true"):
        last = latest_complete_checkpoint(cfg.output_dir)
        if last is None and value == "auto":
            log.info("resume_from_checkpoint: auto: no checkpoint in %s, starting fresh", cfg.output_dir)
        elif last is None:
            raise DolphinError(f"resume_from_checkpoint: true, but {cfg.output_dir} holds no complete checkpoint")
        return str(last) if last else None
    path = Path(str(value))
    if not path.is_dir():
        raise DolphinError(f"resume_from_checkpoint: {value} is not a directory")
    if not checkpoint_is_complete(path):
        raise DolphinError(f"resume_from_checkpoint: {value} is incomplete (no readable trainer_state.json)")
    return str(path)


def make_trainer(
    cfg: Config, runtime: RuntimeSettings, tok: LoadedTokenizer, rows: TrainingRows, schedule: TrainingSchedule
) -> Any:
    from dolphin_train.model.load import load_model
    from dolphin_train.train.arguments import build_training_arguments
    from dolphin_train.train.collator import ChatCollator
    from dolphin_train.train.trainer import DolphinTrainer

    # TrainingArguments first: under DeepSpeed ZeRO-3 they must exist before the model is built so that
    # its weights are partitioned as they load.
    args = build_training_arguments(cfg, runtime, schedule)
    model = load_model(cfg, runtime, tok)
    pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else None
    eval_rows = rows.eval
    if eval_rows is not None and runtime.world_size > 1:
        eval_rows = PaddedToEvenShards(
            eval_rows, runtime.world_size * cfg.micro_batch_size_for_eval, tok.tokenizer.pad_token_id
        )
    trainer = DolphinTrainer(
        model=model,
        args=args,
        train_dataset=rows.train,
        eval_dataset=eval_rows,
        data_collator=ChatCollator(tok.tokenizer.pad_token_id, pad_to=pad_to),
        processing_class=tok.tokenizer,
        chunked_head=_chunked_loss_head(cfg, runtime, model),
    )
    # First in line, so the progress bar, the console printer and the trackers see the throughput it adds
    # to each log.
    trainer.callback_handler.callbacks.insert(0, _throughput_callback(cfg, runtime, model))
    _use_our_progress_bar(trainer)
    return trainer


def _use_our_progress_bar(trainer: Any) -> None:
    """Swap transformers' bar for ours (loss and tokens/s on the bar), through the Trainer's callback API."""
    from transformers import ProgressCallback

    from dolphin_train.train.progress import TrainingProgress

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(TrainingProgress())


def _chunked_loss_head(cfg: Config, runtime: RuntimeSettings, model: Any) -> Any:
    """The output head that computes the chunked loss itself (see loss.py), or None for the plain loss."""
    from dolphin_train.train.loss import install_chunked_head, use_chunked_cross_entropy

    if not use_chunked_cross_entropy(cfg, model.get_input_embeddings().weight.shape[0]):
        return None
    liger_fuses_loss = use_liger(cfg, runtime) and cfg.liger_fused_linear_cross_entropy is not False
    if cfg.chunked_loss_choice is None and liger_fuses_loss:
        return None  # Liger's fused kernel already avoids the full logits
    head = install_chunked_head(model)
    if head is None:
        log.info("Chunked cross-entropy: off, the output head is not a plain projection")
        return None
    log.info("Chunked cross-entropy: the full logits are never materialised")
    return head


def _throughput_callback(cfg: Config, runtime: RuntimeSettings, model: Any) -> Any:
    from dolphin_train.train.throughput import ThroughputCallback, flops_per_token, peak_flops

    if runtime.device != "cuda" or not runtime.bf16:
        return ThroughputCallback()
    import torch

    peak = peak_flops(torch.cuda.get_device_name())
    return ThroughputCallback(flops_per_token(model, cfg.sequence_len), peak, runtime.world_size)


def save_final_model(trainer: Any, output_dir: str) -> None:
    """safetensors weights, config, generation config and tokenizer (with its chat template), ready for
    transformers, vLLM and GGUF converters; the KV cache is re-enabled for inference."""
    from dolphin_train.train.loss import restore_head

    restore_head(trainer.model)
    trainer.model.config.use_cache = True
    trainer.save_model(output_dir)


def _finish_tracking(cfg: Config) -> None:
    """Close the wandb run after the final evaluation, so its summary and history are complete on disk
    (and synced) when the command returns, not at interpreter exit."""
    if not cfg.wandb_project:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()


def warn_if_memory_short(cfg: Config, runtime: RuntimeSettings, tok: LoadedTokenizer) -> float | None:
    """Before the model loads: if `dolphin-train plan` expects this run not to fit this GPU, say so, with
    the change that would fit. A warning, not a stop: the estimate is close, not exact. Returns the
    estimated peak allocated memory in MiB, recorded in the run summary next to the measured one."""
    import torch

    from dolphin_train.plan.memory import GiB
    from dolphin_train.plan.report import find_fix, model_facts, plan_memory

    memory = torch.cuda.get_device_properties(0).total_memory
    try:
        facts = model_facts(cfg, tok)
        estimate = plan_memory(cfg, facts, runtime.world_size, "cuda")
        fix = find_fix(cfg, facts, runtime.world_size, memory, "cuda") if estimate.total > memory else None
    except Exception as exc:  # the plan is advice: it never stops a run
        log.debug("No memory estimate: %s", exc)
        return None
    log.info("Estimated peak memory per GPU: %.1f GiB of %.1f GiB", estimate.total / GiB, memory / GiB)
    if estimate.total > memory:
        advice = f" It would fit with: {fix.as_overrides()}." if fix else ""
        log.warning(
            "This run is estimated to need %.1f GiB per GPU, more than the %.1f GiB this GPU has: it may run out "
            "of memory.%s Details: dolphin-train plan CONFIG", estimate.total / GiB, memory / GiB, advice,
        )  # fmt: skip
    return estimate.allocated / 2**20


@dataclass
class Run:
    """Everything assembled for one training run, before the loop starts."""

    cfg: Config
    runtime: RuntimeSettings
    tok: LoadedTokenizer
    prepared: PreparedData
    rows: TrainingRows
    schedule: TrainingSchedule
    trainer: Any
    memory_before_model_mb: float = 0.0
    planned_peak_mb: float | None = None  # the plan's peak allocated memory per GPU (GPU runs only)


def set_up_run(cfg: Config) -> Run:
    """Follow the flow: runtime → tokenizer → prepared data → rows → schedule → model and Trainer."""
    check_trackers(cfg)
    runtime = resolve_runtime(cfg)
    log.info("Attention: %s (%s)", runtime.attn_implementation, runtime.attention_note)
    tok = load_tokenizer(cfg)
    prepared = prepare_on_main_process_first(cfg, tok, runtime)
    rows = build_rows(cfg, prepared)
    schedule = plan_schedule(cfg, len(rows.train), runtime.world_size, has_eval=rows.eval is not None)
    planned = warn_if_memory_short(cfg, runtime, tok) if runtime.device == "cuda" and is_main_process() else None
    before_model = memory_before_model_mb()
    trainer = make_trainer(cfg, runtime, tok, rows, schedule)
    return Run(cfg, runtime, tok, prepared, rows, schedule, trainer, before_model, planned)


def run_training(cfg: Config, show: Any = None) -> dict[str, Any]:
    """Prepare data, load the model, train, save the final model and tokenizer, summarise.

    `show` renders tables for the user (the CLI passes its console's print); None prints nothing.
    """
    with leaving_the_process_group_at_the_end():
        return _train_and_save(cfg, show)


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


def _train_and_save(cfg: Config, show: Any) -> dict[str, Any]:
    from dolphin_train.train.summary import plan_table

    run = set_up_run(cfg)
    trainer = run.trainer
    is_main = trainer.is_world_process_zero()
    if show and is_main:
        show(run.prepared.report.table())
        show(plan_table(cfg, run.runtime, run.schedule, run.rows, trainer.model, prepared=run.prepared))
    identity, settings = run_identity(cfg, run.prepared), resolved_settings(cfg, run.runtime)
    if is_main:
        save_config_snapshot(cfg.output_dir, settings, identity)
    trainer.add_callback(RecordConfigInTrackers(settings, identity))
    resume = resolve_resume(cfg)
    stop_signal, non_finite = StopOnSignal(), StopOnNonFiniteLoss()
    trainer.add_callback(stop_signal)
    if cfg.stop_on_nan_loss:
        trainer.add_callback(non_finite)
    watchdog = LossWatchdog(*cfg.loss_watchdog) if cfg.loss_watchdog else None
    if watchdog:
        trainer.add_callback(watchdog)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.monotonic() - started
    if non_finite.bad_step is not None:
        raise DolphinError(
            f"the training loss became NaN or infinite at step {non_finite.bad_step}; stopped. Lower the "
            "learning rate, check the data with `dolphin-train inspect`, or resume from an earlier checkpoint"
        )
    if watchdog and watchdog.bad_step is not None:
        raise DolphinError(
            f"the training loss stayed above loss_watchdog_threshold ({watchdog.threshold}) for {watchdog.patience} "
            f"logged steps, up to step {watchdog.bad_step} (loss {watchdog.last_loss:.4g}); stopped. Lower the "
            "learning rate, or resume from an earlier checkpoint"
        )
    if stop_signal.received is not None:
        step = trainer.state.global_step
        summary = {"interrupted": True, "steps": step, "checkpoint": str(Path(cfg.output_dir, f"checkpoint-{step}"))}
        if is_main:
            Path(cfg.output_dir, "run_summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    if run.rows.eval is not None:
        trainer.evaluate()
    save_final_model(trainer, cfg.output_dir)
    _finish_tracking(cfg)
    if not is_main:
        return {}
    return write_run_summary(cfg, trainer, run.prepared, elapsed, run.memory_before_model_mb, run.planned_peak_mb)
