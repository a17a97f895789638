"""What is about to happen, shown before a long run starts."""

from __future__ import annotations

from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.train.schedule import TrainingSchedule


def _count_parameters(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def plan_table(cfg: Config, runtime: RuntimeSettings, schedule: TrainingSchedule, rows: Any, model: Any) -> Any:
    from rich.table import Table

    total, trainable = _count_parameters(model)
    precision = "bf16" if runtime.bf16 else "fp16" if runtime.fp16 else "fp32"
    t = Table(title="Training plan", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("model", f"{cfg.base_model} ({type(model).__name__})")
    t.add_row("parameters (trainable)", f"{total:,} ({trainable:,})")
    if rows.train_plan is not None:
        plan = rows.train_plan
        t.add_row("packing", f"{len(plan.bins):,} rows of {plan.capacity} tokens, {plan.efficiency:.1%} full")
    else:
        t.add_row("packing", f"off: {schedule.rows:,} rows, padded per batch")
    effective = cfg.micro_batch_size * cfg.gradient_accumulation_steps * schedule.world_size
    tokens = f", up to {effective * cfg.sequence_len:,} tokens" if cfg.sample_packing else ""
    t.add_row("effective batch", f"{effective} rows{tokens}")
    t.add_row(
        "steps", f"{schedule.total_steps:,} ({schedule.steps_per_epoch:,} per epoch, {schedule.epochs:.2f} epochs)"
    )
    t.add_row("warmup steps", f"{schedule.warmup_steps:,}")
    t.add_row(
        "eval every", f"{schedule.eval_steps} steps" if schedule.eval_steps else ("epoch" if rows.eval else "never")
    )
    t.add_row("checkpoint every", f"{schedule.save_steps} steps" if schedule.save_steps else "epoch")
    t.add_row("precision", precision + (" + tf32" if runtime.tf32 else ""))
    t.add_row("attention", f"{runtime.attn_implementation} ({runtime.attention_note})")
    t.add_row("device / processes", f"{runtime.device} / {runtime.launcher}")
    sharding = f"DeepSpeed {cfg.deepspeed}" if cfg.deepspeed else f"FSDP {cfg.fsdp}" if cfg.fsdp else "off"
    t.add_row("sharding", sharding)
    t.add_row("output", cfg.output_dir)
    return t
