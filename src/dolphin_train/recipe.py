"""The recipe: one training run, start to finish (runtime → tokenizer → prepared data → rows → schedule →
memory check → model and Trainer → train → save), and the shared opening of the data commands.

It is the one module that uses every stage, `plan` included (the memory check before the model loads);
the CLI only parses and dispatches to it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dolphin_train.config.load import missing_local_model
from dolphin_train.config.resolve import RuntimeSettings, check_dense_mask, resolve_runtime, resolved_settings
from dolphin_train.config.schema import Config
from dolphin_train.data.packing import PaddedToEvenShards, TrainingRows, build_training_rows
from dolphin_train.data.prepare import PreparedData, prepare_data, prepare_on_main_process_first
from dolphin_train.data.sources import resolve_source
from dolphin_train.errors import ConfigError, DataError, DolphinError, EnvironmentProblem
from dolphin_train.model.tokenizer import LoadedTokenizer, load_tokenizer
from dolphin_train.process_group import is_main_process, leaving_the_process_group_at_the_end, world_size
from dolphin_train.terminal import bars_wanted, hide_transformers_bars
from dolphin_train.train.environment import set_up_process_environment
from dolphin_train.train.run_lock import holding_output_dir
from dolphin_train.train.schedule import TrainingSchedule, compute_schedule

log = logging.getLogger(__name__)


# ---- the data commands (`preprocess`, `inspect`) ------------------------------------------------------


def open_prepared_data(cfg: Config) -> tuple[LoadedTokenizer, PreparedData]:
    """The tokenizer and the prepared data (from the cache or prepared now, rank 0 first under torchrun)."""
    tok = load_tokenizer(cfg)
    if world_size() == 1:  # no process group: the device does not matter (detecting it imports torch)
        return tok, prepare_data(cfg, tok.tokenizer)
    with leaving_the_process_group_at_the_end():
        prepared = prepare_on_main_process_first(cfg, tok.tokenizer, resolve_runtime(cfg).device)
    return tok, prepared


def paths_missing_here(cfg: Config) -> list[str]:
    """Files the config names that are absent here: fine for `validate` on a laptop, fatal for `train`."""
    missing = []
    for ds in cfg.datasets:
        try:
            resolve_source(ds)  # local files, directories and globs; a hub id is taken as such
        except DataError as exc:
            missing.append(str(exc))
    if isinstance(cfg.deepspeed, str) and not Path(cfg.deepspeed).exists():
        missing.append(f"deepspeed config not found here: {cfg.deepspeed}")
    models = {"base_model": cfg.base_model, "base_model_config": cfg.base_model_config,
              "tokenizer_config": cfg.tokenizer_config}  # fmt: skip
    missing += [m for k, v in models.items() if v and (m := missing_local_model(k, v))]
    return missing


def choices_for_this_machine(cfg: Config, runtime: RuntimeSettings) -> list[str]:
    """What `validate` adds below the config: the ids the template's markers and the config's tokens get,
    and the `auto` memory settings a run would choose here. Said only when it can be known on this machine
    (the tokenizer and the model's shapes at hand)."""
    from dolphin_train.plan.report import model_facts, resolve_auto_settings

    try:
        facts = model_facts(cfg)
    except DolphinError as exc:
        return [f"tokens and `auto` settings: not known here ({exc})"] if cfg.has_auto_memory_settings else []
    lines = [f"tokens: {facts.token_ids}"] if facts.token_ids else []
    if cfg.has_auto_memory_settings:
        choice, _ = resolve_auto_settings(cfg, facts, runtime, memory_budget(runtime))
        lines += [*choice.reasons, "(`dolphin-train plan CONFIG --gpus N --gpu-memory X` shows the choice for a GPU)"]
    return lines


# ---- training ---------------------------------------------------------------------------------------


def make_trainer(
    cfg: Config,
    runtime: RuntimeSettings,
    tok: LoadedTokenizer,
    rows: TrainingRows,
    schedule: TrainingSchedule,
    resuming: bool = False,
) -> Any:
    from dolphin_train.model.attention import takes_sequence_boundaries
    from dolphin_train.model.load import compile_layers, convert_to_float8, load_model
    from dolphin_train.model.loftq import has_loftq_base
    from dolphin_train.train.arguments import build_training_arguments, liger_fuses_loss, liger_settings
    from dolphin_train.train.collator import ChatCollator
    from dolphin_train.train.generation_eval import GenerationEval, require_metric_packages
    from dolphin_train.train.outputs import KeepLoftQBase, PeakMemoryFromTrainingStart
    from dolphin_train.train.schedule import jagged_restarts
    from dolphin_train.train.trainer import DolphinTrainer

    # TrainingArguments first: under DeepSpeed ZeRO-3 they must exist before the model is built so that
    # its weights are partitioned as they load.
    liger = liger_settings(cfg, runtime, head_has_token_rows=bool(cfg.adapter and tok.new_token_ids
                                                                     and cfg.lora_modules_to_save is None))  # fmt: skip
    args = build_training_arguments(cfg, runtime, schedule, liger)
    require_metric_packages(cfg)  # before the model's load, not at the first evaluation
    model = load_model(cfg, runtime, tok, weights_from_checkpoint=resuming)
    if cfg.fp8:
        convert_to_float8(model, fsdp_float8_all_gather=cfg.fp8_enable_fsdp_float8_all_gather)
    if runtime.compile:  # after float8: its scaling then compiles into the layers
        compile_layers(model, cfg, runtime)
    hide_transformers_bars()  # after the model's download and load bars: not one per checkpoint
    context = _context_group(cfg, runtime, model, liger_fuses_loss(liger))
    pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else None
    # Sequence boundaries in the batch for our attention entry point. Not with Liger's fused loss: the model
    # hands its extra kwargs to the loss too, and Liger releases before its kwargs filter pass them to a kernel
    # that refuses them; the attention then reads the boundaries from the position ids, once per forward.
    boundaries = takes_sequence_boundaries(model) and not liger_fuses_loss(liger)
    eval_rows = rows.eval
    data_parallel = runtime.world_size // cfg.cp_size  # the processes of a context-parallel group share rows
    if eval_rows is not None and data_parallel > 1:
        eval_rows = PaddedToEvenShards(
            eval_rows, data_parallel * cfg.micro_batch_size_for_eval, tok.tokenizer.pad_token_id
        )
    trainer = DolphinTrainer(
        model=model,
        args=args,
        train_dataset=rows.train,
        eval_dataset=eval_rows,
        data_collator=ChatCollator(tok.tokenizer.pad_token_id, pad_to, boundaries=boundaries),
        processing_class=tok.tokenizer,
        chunked_head=_chunked_loss_head(cfg, model, liger_fuses_loss(liger)),
        throughput=_throughput_meter(cfg, runtime, model),
        optimizer_in_backward=_parameter_optimizer(cfg),
        generation_eval=GenerationEval(cfg, tok.tokenizer) if cfg.generates_at_evaluation else None,
        lr_multiplier=jagged.multiplier if (jagged := jagged_restarts(cfg)) else None,
        lr_schedule=_cosine_then_constant(cfg, schedule),
        context_group=context,
    )
    _use_our_console(trainer)
    trainer.add_callback(PeakMemoryFromTrainingStart())
    if cfg.llmcompressor:
        from dolphin_train.train.sparsity import KeepZeros

        trainer.add_callback(KeepZeros(model, cfg.llmcompressor.targets))
    if cfg.loftq is not None or has_loftq_base(cfg.lora_model_dir):
        trainer.add_callback(KeepLoftQBase(model))
    if cfg.fp8_enable_fsdp_float8_all_gather:
        from dolphin_train.train.float8_scales import Float8ScalesForFsdp

        trainer.add_callback(Float8ScalesForFsdp())
    if cfg.lisa_n_layers:
        from dolphin_train.train.lisa import LayerwiseSampling

        if runtime.world_size > 1:  # DDP reduces the gradients of the parameters it started with, every step
            raise EnvironmentProblem(f"lisa_n_layers runs in one process; this launch has {runtime.world_size}")
        trainer.add_callback(LayerwiseSampling.from_config(cfg, model))
    return trainer


def _context_group(cfg: Config, runtime: RuntimeSettings, model: Any, liger_loss: bool) -> Any:
    """With `context_parallel_size` above 1: this process's group, and the model's attention kernel wrapped to
    exchange heads for tokens (model/context_parallel.py); None otherwise."""
    if cfg.cp_size == 1:
        return None
    if liger_loss:  # it computes the loss in the model's forward from unshifted labels, and takes no boundaries
        raise EnvironmentProblem(f"context_parallel_size: {cfg.cp_size} with Liger's fused cross-entropy: not "
                                 "supported; set liger_fused_linear_cross_entropy: false (the chunked loss "
                                 "serves instead)")  # fmt: skip
    from dolphin_train.model.attention import BACKEND_KERNELS, register_packed_attention
    from dolphin_train.model.context_parallel import ContextParallelKernel, check_heads, join_context_group
    from dolphin_train.process_group import join_process_group

    backend = model.config._attn_implementation
    if backend not in BACKEND_KERNELS:  # the kernel lacked something the model needs (model/load.py said which)
        raise EnvironmentProblem(f"context_parallel_size: {cfg.cp_size} needs our variable-length attention, but "
                                 f"this model runs {backend} attention (see the log's attention line)")  # fmt: skip
    if problem := check_heads(model.config, cfg.cp_size):
        raise ConfigError(problem)
    join_process_group(runtime.device)
    register_packed_attention(backend, ContextParallelKernel.around(BACKEND_KERNELS[backend]()))
    return join_context_group(cfg.cp_size)


def _use_our_console(trainer: Any) -> None:
    """Swap transformers' bar (and its dict-printing log) for ours, through the Trainer's callback API."""
    from transformers import PrinterCallback, ProgressCallback

    from dolphin_train.train.console import TrainingConsole

    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    trainer.add_callback(TrainingConsole(bar=bars_wanted()))


def _cosine_then_constant(cfg: Config, schedule: TrainingSchedule) -> Any:
    """`cosine_constant_lr_ratio`'s schedule (train/schedule.py), or None for transformers' own."""
    if not (cfg.cosine_constant_lr_ratio and cfg.cosine_min_lr_ratio is not None):
        return None
    from dolphin_train.train.schedule import cosine_then_constant_schedule

    return partial(cosine_then_constant_schedule, warmup=schedule.warmup_steps, min_ratio=cfg.cosine_min_lr_ratio,
                   constant_ratio=cfg.cosine_constant_lr_ratio)  # fmt: skip


def _parameter_optimizer(cfg: Config) -> Any:
    """Each parameter's own optimizer, for `optimizer_in_backward`; None for the Trainer's usual one."""
    if not cfg.optimizer_in_backward:
        return None
    from dolphin_train.train.in_backward import STOCHASTIC_ROUNDING, parameter_optimizer

    if cfg.bfloat16 and not STOCHASTIC_ROUNDING[cfg.optimizer]:
        log.warning("bfloat16 weights with %s round each update to the nearest bf16 value: updates smaller "
                    "than the weight's precision are lost; adamw_torch_8bit rounds stochastically",
                    cfg.optimizer)  # fmt: skip
    betas = (cfg.adam_beta1 or 0.9, cfg.adam_beta2 or 0.999)
    return parameter_optimizer(cfg.optimizer, cfg.learning_rate, betas, cfg.adam_epsilon or 1e-8)


def _chunked_loss_head(cfg: Config, model: Any, liger_loss: bool) -> Any:
    """The output head that computes the chunked loss itself (see loss.py), or None for the plain loss (or
    Liger's fused one)."""
    from dolphin_train.train.loss import install_chunked_head, use_chunked_cross_entropy

    if not use_chunked_cross_entropy(cfg, model.get_input_embeddings().weight.shape[0]):
        return None
    if cfg.chunked_loss_choice is None and liger_loss:
        return None  # Liger's fused kernel already avoids the full logits
    head = install_chunked_head(model)
    if head is None:
        log.info("Chunked cross-entropy: off, the output head is not a plain projection")
        return None
    log.info("Chunked cross-entropy: the full logits are never materialised")
    return head


def _throughput_meter(cfg: Config, runtime: RuntimeSettings, model: Any) -> Any:
    """Tokens per second always; MFU where the GPU's bf16 peak is known."""
    from dolphin_train.model.layers import decoder_layers
    from dolphin_train.train.throughput import ThroughputMeter, model_flops, peak_flops

    if runtime.device != "cuda" or not runtime.bf16:
        return ThroughputMeter(compiled=runtime.compile)
    import torch

    layers = len(decoder_layers(model))
    checkpointed = -(-layers // cfg.gradient_checkpointing_layers) if cfg.checkpointing else 0
    peak = peak_flops(torch.cuda.get_device_name())
    return ThroughputMeter(model_flops(model, checkpointed), peak, runtime.world_size, compiled=runtime.compile,
                           shared_by=cfg.cp_size)  # fmt: skip


def _finish_tracking(cfg: Config) -> None:
    """Close the wandb run after the final evaluation, so its summary and history are complete on disk
    (and synced) when the command returns, not at interpreter exit."""
    if not cfg.uses_wandb:
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
        estimate = plan_memory(cfg, facts, runtime)
        fix = find_fix(cfg, facts, runtime, memory) if estimate.total > memory else None
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


def _evaluated_at(state: Any, step: int) -> bool:
    """Whether the Trainer's own schedule already evaluated at this step (it does at the last one when
    `eval_steps` divides it): the final evaluation is not run twice."""
    return any("eval_loss" in e and e.get("step") == step for e in state.log_history)


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
    resume_from: str | None = None  # the checkpoint this run continues from
    memory_before_model_mb: float = 0.0
    planned_peak_mb: float | None = None  # the plan's peak allocated memory per GPU (GPU runs only)
    metrics: Any = None  # the Prometheus endpoint (`use_otel_metrics`), on the main process


def memory_budget(runtime: RuntimeSettings) -> int:
    """Bytes a process may use: the GPU's memory, or on the CPU the machine's memory shared by its processes."""
    from dolphin_train.config.machine import Machine

    found = Machine.detect()
    if runtime.device == "cuda" and found.memory:
        return found.memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(1, runtime.world_size)


def decide_auto_settings(cfg: Config, runtime: RuntimeSettings, tok: LoadedTokenizer, rows: int) -> Config:
    """`micro_batch_size`, `gradient_checkpointing` and `activation_offloading: auto`, decided by the plan for
    this device (every process decides alike); the run then goes on with the decided config."""
    if not cfg.has_auto_memory_settings:
        return cfg
    from dolphin_train.plan.report import model_facts, resolve_auto_settings

    choice, _ = resolve_auto_settings(cfg, model_facts(cfg, tok), runtime, memory_budget(runtime), rows)
    for reason in choice.reasons:
        (log.info if choice.fits else log.warning)(reason)
    return choice.cfg


def import_quantisation_library(cfg: Config) -> None:
    """Import bitsandbytes, when the run uses it, before the memory baseline is read. Its import is library
    code, not the training's memory, and `plan` does not count it; yet it costs about 120 MiB of resident
    memory on a CPU with AVX-512 BF16, where bitsandbytes 0.50 also tries to load a CPU kernel from the
    Hugging Face hub, so the measured peak would depend on the CPU."""
    optimizer = cfg.optimizer or ""
    if cfg.load_in_4bit or cfg.load_in_8bit or optimizer in ("adamw_8bit", "adamw_bnb_8bit") or optimizer.startswith(
        "paged_"
    ):
        import bitsandbytes  # noqa: F401


def set_up_run(cfg: Config) -> Run:
    """Follow the flow: runtime → tokenizer → prepared data → rows → schedule → model and Trainer."""
    # The training stack (transformers' Trainer, torch, peft) is imported here, not at the top: `preprocess`
    # and `inspect` never need it, and importing it costs seconds.
    from dolphin_train.train.control import checkpoint_step, remove_incomplete_checkpoints, resolve_resume
    from dolphin_train.train.outputs import memory_before_model_mb

    runtime = resolve_runtime(cfg)
    check_dense_mask(cfg, runtime.attn_implementation)
    set_up_process_environment(cfg, runtime)
    metrics = _serve_metrics(cfg)  # before the long steps, so a taken port fails at once
    log.info("Attention: %s (%s)", runtime.attn_implementation, runtime.attention_note)
    if cfg.float16:
        log.warning("float16: weights and arithmetic in float16 without a loss scaler: gradients below ~6e-8 "
                    "become zero and updates below a weight's float16 precision are lost; fp16: true scales "
                    "the loss and keeps float32 master weights")  # fmt: skip
    tok = load_tokenizer(cfg)
    prepared = prepare_on_main_process_first(cfg, tok.tokenizer, runtime.device)
    rows = build_training_rows(cfg, prepared)
    cfg = decide_auto_settings(cfg, runtime, tok, len(rows.train))
    # One context-parallel group consumes one batch: world size / context_parallel_size data-parallel ranks.
    schedule = compute_schedule(cfg, len(rows.train), runtime.world_size // cfg.cp_size, has_eval=rows.eval is not None)
    planned = warn_if_memory_short(cfg, runtime, tok) if runtime.device == "cuda" and is_main_process() else None
    resume = resolve_resume(cfg)
    if is_main_process():
        remove_incomplete_checkpoints(cfg.output_dir)
    if resume:
        step = checkpoint_step(resume)
        log.info("Resuming from %s: %d of %d steps done", resume, step, schedule.total_steps)
    import_quantisation_library(cfg)
    before_model = memory_before_model_mb()
    trainer = make_trainer(cfg, runtime, tok, rows, schedule, resuming=resume is not None)
    if metrics:
        trainer.add_callback(metrics)
    if cfg.relora:
        from dolphin_train.train.relora import ReLoRA

        trainer.add_callback(ReLoRA.from_config(cfg, trainer.model, resume))
    return Run(cfg, runtime, tok, prepared, rows, schedule, trainer, resume, before_model, planned, metrics)


def _serve_metrics(cfg: Config) -> Any:
    """The Prometheus endpoint of `use_otel_metrics`, served by the main process only."""
    if cfg.metrics_address is None or not is_main_process():
        return None
    from dolphin_train.train.metrics_server import PrometheusMetrics

    metrics = PrometheusMetrics(*cfg.metrics_address)
    log.info("Metrics: served for Prometheus at %s", metrics.url)
    return metrics


def run_training(cfg: Config, show: Any = None) -> dict[str, Any]:
    """Prepare data, load the model, train, save the final model and tokenizer, summarise.

    `show` renders tables for the user (the CLI passes its console's print); None prints nothing.
    """
    # The output_dir's lock first, so a second run into it is refused before it prepares anything.
    with leaving_the_process_group_at_the_end(), holding_output_dir(cfg.output_dir):
        return _train_and_save(cfg, show)


def _train_and_save(cfg: Config, show: Any) -> dict[str, Any]:
    run = set_up_run(cfg)
    try:
        return _train_run(run, show)
    finally:
        if run.metrics:
            run.metrics.close()


def _train_run(run: Run, show: Any) -> dict[str, Any]:
    from dolphin_train.train.control import EarlyStopping, LossWatchdog, StopOnNonFiniteLoss, StopOnSignal
    from dolphin_train.train.outputs import (
        RecordConfigInTrackers,
        run_identity,
        save_config_snapshot,
        save_final_model,
        write_run_summary,
    )
    from dolphin_train.train.overview import run_overview

    cfg = run.cfg  # with any `auto` memory settings decided
    trainer = run.trainer
    is_main = trainer.is_world_process_zero()
    if show and is_main:
        show(run.prepared.report.table())
        show(run_overview(cfg, run.runtime, run.schedule, run.rows, trainer.model, prepared=run.prepared))
    if show and is_main and cfg.debug:  # axolotl's label check: one training row as the model sees it
        from dolphin_train.data.inspect import labelled_example

        show(labelled_example(run.tok.tokenizer, run.prepared.train[0], 0, show_ids=True))
    identity, settings = run_identity(cfg, run.prepared), resolved_settings(cfg, run.runtime)
    if is_main:
        save_config_snapshot(cfg.output_dir, settings, identity)
    trainer.add_callback(RecordConfigInTrackers(settings, identity))
    stop_signal, non_finite = StopOnSignal(), StopOnNonFiniteLoss()
    trainer.add_callback(stop_signal)
    if cfg.stop_on_nan_loss:
        trainer.add_callback(non_finite)
    watchdog = LossWatchdog(*cfg.loss_watchdog) if cfg.loss_watchdog else None
    if watchdog:
        trainer.add_callback(watchdog)
    early = EarlyStopping(cfg.early_stopping_patience) if cfg.early_stopping_patience else None
    if early:
        trainer.add_callback(early)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=run.resume_from)
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
    if early and early.stopped_step is not None and is_main:
        log.info("Stopped early at step %d: the evaluation loss has not improved in %d evaluation(s); its best, "
                 "%.4g, was at step %d", early.stopped_step, early.patience, early.best, early.best_step)  # fmt: skip
    if stop_signal.received is not None:
        step = trainer.state.global_step
        summary = {"interrupted": True, "steps": step, "checkpoint": str(Path(cfg.output_dir, f"checkpoint-{step}"))}
        if is_main:
            Path(cfg.output_dir, "run_summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    if run.rows.eval is not None and not _evaluated_at(trainer.state, trainer.state.global_step):
        trainer.evaluate()
    if cfg.relora:  # the base weights changed at every restart: an adapter alone would not describe them
        from dolphin_train.train.relora import merged_model

        trainer.model = merged_model(trainer.model)
    save_final_model(trainer, cfg.output_dir)
    if cfg.llmcompressor and is_main:
        from dolphin_train.train.sparsity import save_recipe

        save_recipe(cfg.output_dir, cfg.llmcompressor)
    _finish_tracking(cfg)
    if not is_main:
        return {}
    summary = write_run_summary(cfg, trainer, run.prepared, elapsed, run.memory_before_model_mb, run.planned_peak_mb)
    return {**summary, "resumed_from": run.resume_from}
