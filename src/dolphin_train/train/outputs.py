"""What a run writes beside its model: the final model itself, the config it ran with (and the same in
wandb), and at the end a summary of what happened (`run_summary.json`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from dolphin_train.config.schema import Config
from dolphin_train.data.prepare import PreparedData

CONFIG_SNAPSHOT = "dolphin_train_config.yml"


def save_final_model(trainer: Any, output_dir: str) -> None:
    """safetensors weights, config, generation config and tokenizer (with its chat template), ready for
    transformers, vLLM and GGUF converters; the KV cache is re-enabled for inference."""
    from dolphin_train.train.loss import restore_head

    restore_head(trainer.model)
    trainer.model.config.use_cache = True
    trainer.save_model(output_dir)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.model_dump_json(by_alias=True).encode()).hexdigest()[:16]


def _eval_losses(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e]


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by PyTorch on CUDA, since training began (`PeakMemoryFromTrainingStart`);
    peak resident memory of the process on the CPU (loading included: Linux's high-water mark is not reset)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_resident_mb()


def _peak_resident_mb() -> float:
    """The high-water mark of this program's own memory (VmHWM). Why not getrusage's ru_maxrss: Linux folds
    the launching process's peak into it at exec, so a run started from a large process (a test session, a
    notebook) reports that process's peak instead of its own."""
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: Any) -> None:
    """The CUDA allocator's peak statistics start again from what is allocated now."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PeakMemoryFromTrainingStart(TrainerCallback):
    """`peak_memory_mb` measures training: the set-up before it (loading, quantising, LoftQ's SVDs, DeepSpeed's
    initialisation) can peak higher than any step, and would otherwise be what is reported."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reset_peak_memory(args.device)


def peak_reserved_mb() -> float:
    """Peak memory PyTorch's CUDA allocator reserved (allocated plus its cache); 0 on the CPU."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else 0.0


def memory_before_model_mb() -> float:
    """What the process holds before the model is built: 0 on CUDA (the data never reaches the GPU),
    resident memory on the CPU, so that peak minus this is the training's own memory."""
    import torch

    if torch.cuda.is_available():
        return 0.0
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("dolphin-train", "torch", "transformers", "datasets", "accelerate", "peft", "bitsandbytes",
                 "deepspeed", "flash-attn", "tiktoken"):  # fmt: skip
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_run_summary(
    cfg: Config,
    trainer: Any,
    prepared: PreparedData,
    seconds: float,
    before_model_mb: float = 0.0,
    planned_peak_mb: float | None = None,
) -> dict[str, Any]:

    history = trainer.state.log_history
    evals = _eval_losses(history)
    train_losses = [e["loss"] for e in history if "loss" in e]
    summary = {
        **run_identity(cfg, prepared),
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "world_size": trainer.args.world_size,
        "train_seconds": round(seconds, 1),
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_losses": evals,
        "first_eval_loss": evals[0][1] if evals else None,
        "final_eval_loss": evals[-1][1] if evals else None,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "memory_before_model_mb": round(before_model_mb, 1),
        "peak_reserved_mb": round(peak_reserved_mb(), 1),
        # `dolphin-train plan`'s estimate of peak_memory_mb, made before the model loaded (GPU runs only).
        "planned_peak_mb": round(planned_peak_mb, 1) if planned_peak_mb is not None else None,
        "versions": library_versions(),
    }
    Path(cfg.output_dir, "run_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_identity(cfg: Config, prepared: PreparedData) -> dict[str, str]:
    """Two short hashes that tell runs apart: the config as validated, and the prepared data."""
    return {"config_hash": config_hash(cfg), "data_fingerprint": prepared.report.fingerprint}


def save_config_snapshot(output_dir: str, settings: dict[str, Any], identity: dict[str, str]) -> Path:
    """The config this run used (`resolved_settings`: defaults filled in, `auto` resolved), saved next to
    the model: the output directory then says how it was made, whatever happens to the YAML file."""
    path = Path(output_dir, CONFIG_SNAPSHOT)
    path.parent.mkdir(parents=True, exist_ok=True)
    version = library_versions().get("dolphin-train", "?")
    header = (
        f"# The config this run used (dolphin-train {version}): defaults filled in, `auto` resolved.\n"
        f"# config_hash {identity['config_hash']}, data_fingerprint {identity['data_fingerprint']}\n"
    )
    body = yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
    path.write_text(header + body)
    return path


class RecordConfigInTrackers(TrainerCallback):
    """Puts the same resolved config and hashes in the wandb run's config (under `dolphin_train`), so a
    run on the dashboard can be traced to exactly what it ran. Added after the Trainer's own wandb
    callback, whose `on_train_begin` starts the run."""

    def __init__(self, settings: dict[str, Any], identity: dict[str, str]) -> None:
        self.record = {"dolphin_train": settings, **identity}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or "wandb" not in (args.report_to or []):
            return
        import wandb

        if wandb.run is not None:
            wandb.run.config.update(self.record, allow_val_change=True)


class KeepLoftQBase(TrainerCallback):
    """A LoftQ adapter is relative to the quantised base LoftQ left, not to the original base model: that base
    (the adapted layers' weights) is written next to the final adapter when training starts, and linked into
    every checkpoint, so that each adapter directory can be merged, chatted with or continued from."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from dolphin_train.model.loftq import save_loftq_base

        if state.is_world_process_zero:
            save_loftq_base(self.model, args.output_dir)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from dolphin_train.model.loftq import LOFTQ_BASE_FILE

        if not state.is_world_process_zero:
            return
        source = Path(args.output_dir, LOFTQ_BASE_FILE)
        target = Path(args.output_dir, f"checkpoint-{state.global_step}", LOFTQ_BASE_FILE)
        if target.parent.is_dir() and not target.exists():
            try:
                os.link(source, target)  # the same bytes: no second copy on disk
            except OSError:
                import shutil

                shutil.copyfile(source, target)
