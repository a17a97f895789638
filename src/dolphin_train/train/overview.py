"""The run overview: what is about to happen (model, data, packing, batch, steps, precision, devices),
shown before a long run starts."""

from __future__ import annotations

from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.data.prepare import PreparedData
from dolphin_train.model.adapters import parameter_count
from dolphin_train.train.schedule import TrainingSchedule


def _count_parameters(model: Any) -> tuple[int, int]:
    total = sum(parameter_count(p) for p in model.parameters())
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def data_rows(prepared: PreparedData) -> list[tuple[str, str]]:
    """Training and eval set sizes. Token counts are the training split's own (the preparation report's
    totals include the eval rows)."""
    import numpy as np

    train = prepared.train
    tokens, trainable = (int(np.asarray(train[column], dtype=np.int64).sum()) for column in ("length", "trainable"))
    n_eval = len(prepared.eval) if prepared.eval is not None else 0
    return [
        ("train data", f"{len(train):,} conversations, {tokens:,} tokens ({trainable:,} trained)"),
        ("eval data", f"{n_eval:,} conversations" if n_eval else "none"),
    ]


def memory_settings(cfg: Config) -> str:
    """Checkpointing, offloading and where the optimizer steps, in words."""
    every = cfg.gradient_checkpointing_layers
    if not cfg.checkpointing:
        said = ["no gradient checkpointing"]
    else:
        said = ["gradient checkpointing of " + ("every layer" if every == 1 else f"every {every} layers")]
    if cfg.offloads_activations:
        said.append("checkpointed activations in CPU memory")
    if cfg.optimizer_in_backward:
        said.append("optimizer step in the backward pass")
    return ", ".join(said)


def run_overview(
    cfg: Config,
    runtime: RuntimeSettings,
    schedule: TrainingSchedule,
    rows: Any,
    model: Any,
    prepared: PreparedData | None = None,
) -> Any:
    """`prepared` adds the data sizes."""
    from rich.table import Table

    total, trainable = _count_parameters(model)
    t = Table(title="Run overview", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("model", f"{cfg.base_model} ({type(model).__name__})")
    t.add_row("parameters (trainable)", f"{total:,} ({trainable:,})")
    for what, value in data_rows(prepared) if prepared is not None else []:
        t.add_row(what, value)
    if rows.train_layout is not None:
        layout = rows.train_layout
        t.add_row("packing", f"{len(layout.bins):,} rows of {layout.capacity} tokens, {layout.efficiency:.1%} full")
    else:
        padding = "to sequence_len" if cfg.pad_to_sequence_len else "per batch"
        t.add_row("packing", f"off: {schedule.rows:,} rows, padded {padding}")
    t.add_row("effective batch", schedule.batch.describe())
    t.add_row(
        "steps", f"{schedule.total_steps:,} ({schedule.steps_per_epoch:,} per epoch, {schedule.epochs:.2f} epochs)"
    )
    t.add_row("warmup steps", f"{schedule.warmup_steps:,}")
    t.add_row(
        "eval every", f"{schedule.eval_steps} steps" if schedule.eval_steps else ("epoch" if rows.eval else "never")
    )
    t.add_row("checkpoint every", f"{schedule.save_steps} steps" if schedule.save_steps else "epoch")
    if cfg.jagged_restart_steps:
        merged = "LoRA merged into the base and restarted, " if cfg.relora else ""
        t.add_row("restarts", f"every {cfg.jagged_restart_steps} steps: {merged}learning rate warmed up again")
    t.add_row("precision", runtime.precision + (" + tf32" if runtime.tf32 else "")
              + (", bf16 weights (no float32 master copy)" if cfg.bfloat16 else "")
              + (" -> fp16 weights and arithmetic (no mixed precision)" if cfg.float16 else ""))  # fmt: skip
    t.add_row("memory", memory_settings(cfg))
    t.add_row("attention", f"{runtime.attn_implementation} ({runtime.attention_note})")
    t.add_row("device / processes", f"{runtime.device} / {runtime.launcher}")
    sharding = f"DeepSpeed {cfg.deepspeed}" if cfg.deepspeed else f"FSDP {cfg.fsdp}" if cfg.fsdp else "off"
    t.add_row("sharding", sharding)
    if cfg.cp_size > 1:
        groups = runtime.world_size // cfg.cp_size
        t.add_row("context parallel", f"{groups} group(s) of {cfg.cp_size} processes, each sharing its rows and "
                                      f"computing 1/{cfg.cp_size} of their tokens")  # fmt: skip
    t.add_row("output", cfg.output_dir)
    return t
