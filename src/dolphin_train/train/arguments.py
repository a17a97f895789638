"""Config + runtime + schedule → transformers.TrainingArguments (the only place this mapping lives)."""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError, EnvironmentProblem
from dolphin_train.train.schedule import TrainingSchedule


def deepspeed_config(cfg: Config) -> str | dict[str, Any] | None:
    if cfg.deepspeed is None or isinstance(cfg.deepspeed, dict):
        return cfg.deepspeed
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise DolphinError(
            f"deepspeed: {cfg.deepspeed} not found (relative paths are resolved from {Path.cwd()}; "
            "the repository ships deepspeed_configs/)"
        )
    return str(path)


def fsdp_config(cfg: Config) -> dict[str, Any] | None:
    """FSDP2 by default (per-parameter sharding, the PyTorch-recommended version); the user's keys win."""
    if not cfg.fsdp:
        return None
    settings = {k.removeprefix("fsdp_"): v for k, v in (cfg.fsdp_config or {}).items()}
    return {"version": 2, **settings}


def wandb_environment(cfg: Config) -> dict[str, str]:
    """wandb reads its settings from the environment; map the config's wandb_* keys onto it."""
    pairs = {
        "WANDB_PROJECT": cfg.wandb_project,
        "WANDB_ENTITY": cfg.wandb_entity,
        "WANDB_NAME": cfg.wandb_name,
        "WANDB_RUN_ID": cfg.wandb_run_id,
        "WANDB_MODE": cfg.wandb_mode,
        "WANDB_WATCH": cfg.wandb_watch,
        "WANDB_LOG_MODEL": cfg.wandb_log_model,
    }
    env = {k: v for k, v in pairs.items() if v is not None}
    if cfg.wandb_project and "WANDB_DIR" not in os.environ:
        env["WANDB_DIR"] = cfg.output_dir  # runs (offline ones too) live next to the model they trained
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.wandb_run_id:
        env["WANDB_RESUME"] = "allow"
    return env


def tensorboard_installed() -> bool:
    """transformers' TensorBoard callback writes through torch.utils.tensorboard (the `tensorboard` package)
    or, failing that, tensorboardX."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def check_trackers(cfg: Config) -> None:
    """Fail before any data is prepared, rather than when the Trainer is built."""
    if cfg.use_tensorboard and not tensorboard_installed():
        raise EnvironmentProblem("use_tensorboard: true, but TensorBoard is not installed: pip install tensorboard")


def report_to(cfg: Config) -> list[str] | str:
    """The experiment trackers the Trainer logs to; "none" turns off transformers' own default choice."""
    trackers = (["wandb"] if cfg.wandb_project else []) + (["tensorboard"] if cfg.use_tensorboard else [])
    return trackers or "none"


def deepspeed_environment(runtime: RuntimeSettings) -> dict[str, str]:
    """accelerate imports DeepSpeed whenever it is installed, and DeepSpeed then warns on every CPU-only
    machine that it could not detect an accelerator. Naming the accelerator we chose says the same, quietly."""
    if runtime.device == "cpu" and "DS_ACCELERATOR" not in os.environ:
        return {"DS_ACCELERATOR": "cpu"}
    return {}


def use_liger(cfg: Config, runtime: RuntimeSettings) -> bool:
    """Liger's kernels where `liger_kernel` allows them and liger-kernel is installed on CUDA (applied by
    transformers' `use_liger_kernel`); its fused linear cross-entropy never materialises the full logits
    either. The `liger_*` keys (axolotl's LigerPlugin settings) pick the kernels."""
    return cfg.liger_kernel and runtime.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def configure_deepspeed_on_cpu() -> dict[str, Any]:
    """DeepSpeed over CPU processes (gloo). TrainingArguments would build accelerate's state without a
    backend on a machine with no GPU, so that accelerate counts one process while DeepSpeed counts all of
    them. We build the state ourselves, the way TrainingArguments does for DeepSpeed (the same
    environment flag) but with the gloo backend, and ask TrainingArguments to use it (a supported
    `accelerator_config` option)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"use_configured_state": True}


def cpu_without_deepspeed(cfg: Config, runtime: RuntimeSettings) -> bool:
    """accelerate's CPU flag: it makes a CPU torchrun distributed over gloo, but it also bypasses the
    DeepSpeed set-up, which DeepSpeed on CPUs needs."""
    return runtime.device == "cpu" and not cfg.deepspeed


def _checkpointing_argument(arguments_class: Any) -> str:
    """transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing`."""
    params = inspect.signature(arguments_class.__init__).parameters
    return "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"


def build_training_arguments(cfg: Config, runtime: RuntimeSettings, schedule: TrainingSchedule) -> Any:
    from transformers import TrainingArguments

    os.environ.update(wandb_environment(cfg))
    os.environ.update(deepspeed_environment(runtime))
    has_eval = schedule.eval_steps is not None or cfg.val_set_size > 0
    optional = {
        k: v
        for k, v in {
            "adam_beta1": cfg.adam_beta1,
            "adam_beta2": cfg.adam_beta2,
            "adam_epsilon": cfg.adam_epsilon,
            "lr_scheduler_kwargs": cfg.lr_scheduler_kwargs,
            "save_total_limit": cfg.save_total_limit,
        }.items()
        if v is not None
    }
    if cfg.deepspeed and runtime.device == "cpu":
        if runtime.world_size == 1:
            raise EnvironmentProblem(
                "deepspeed on the CPU runs over several processes: launch with `--num-processes 2` (or torchrun "
                "--nproc_per_node 2), or remove `deepspeed` for a single process"
            )
        optional["accelerator_config"] = configure_deepspeed_on_cpu()
    checkpointing = _checkpointing_argument(TrainingArguments)
    optional[checkpointing] = cfg.gradient_checkpointing
    if cfg.liger_kernel_config and use_liger(cfg, runtime):
        optional["liger_kernel_config"] = cfg.liger_kernel_config
    if cfg.gradient_checkpointing_kwargs is not None:
        optional[f"{checkpointing}_kwargs"] = cfg.gradient_checkpointing_kwargs
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size_for_eval,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=schedule.total_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=schedule.warmup_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        max_grad_norm=cfg.max_grad_norm,
        bf16=runtime.bf16,
        fp16=runtime.fp16,
        tf32=runtime.tf32 if runtime.device == "cuda" else None,
        dataloader_pin_memory=runtime.device == "cuda",
        use_cpu=cpu_without_deepspeed(cfg, runtime),
        # Off unless asked: the search for unused parameters costs a graph traversal per step.
        ddp_find_unused_parameters=bool(cfg.ddp_find_unused_parameters),
        logging_steps=cfg.logging_steps,
        # transformers hides its progress bar when its logging is quieter than warnings, as ours is by
        # default; the bar (train/progress.py) is how a run shows where it is.
        disable_tqdm=False,
        eval_strategy=("steps" if schedule.eval_steps else "epoch") if has_eval else "no",
        eval_steps=schedule.eval_steps,
        eval_on_start=has_eval,
        save_strategy="steps" if schedule.save_steps else "epoch",
        save_steps=schedule.save_steps or 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to(cfg),
        run_name=cfg.wandb_name,
        deepspeed=deepspeed_config(cfg),
        fsdp=cfg.fsdp or "",
        fsdp_config=fsdp_config(cfg),
        # Our rows carry only what the model needs; the column check would drop position_ids.
        remove_unused_columns=False,
        # The loss is the mean over every trainable token of the global batch, on any number of processes.
        average_tokens_across_devices=True,
        include_num_input_tokens_seen="non_padding",
        # Only the loss is needed from evaluation; gathering logits would cost tokens x vocabulary memory.
        prediction_loss_only=True,
        # Log the loss as it is: the default filter replaces NaN/inf by an average and hides divergence.
        logging_nan_inf_filter=False,
        use_liger_kernel=use_liger(cfg, runtime),
        **optional,
    )
