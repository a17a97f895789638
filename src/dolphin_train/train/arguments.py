"""Config + runtime + schedule → transformers.TrainingArguments (the only place this mapping lives).

A pure mapping: the process environment it relies on (trackers, DeepSpeed on CPUs) is set up by the
recipe first (`train/environment.py`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError, EnvironmentProblem
from dolphin_train.model.kernel_choice import liger_mlp_settings, mlp_forward, use_liger
from dolphin_train.train.environment import deepspeed_on_cpu
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


def fsdp_settings(cfg: Config) -> dict[str, Any] | None:
    """FSDP2 by default (per-parameter sharding, the PyTorch-recommended version); the user's keys win,
    with axolotl's `fsdp_` prefixes removed. `plan` reads the sharding from the same settings."""
    if not cfg.fsdp:
        return None
    settings = {k.removeprefix("fsdp_"): v for k, v in (cfg.fsdp_config or {}).items()}
    return {**settings, "version": cfg.fsdp_version_in_use}


def fsdp_options(cfg: Config) -> list[str]:
    """`fsdp: [full_shard, auto_wrap]` or `fsdp: "full_shard auto_wrap"` as a list of options."""
    if not cfg.fsdp:
        return []
    return list(cfg.fsdp) if isinstance(cfg.fsdp, list) else str(cfg.fsdp).split()


def trainer_autocasts(cfg: Config, runtime: RuntimeSettings) -> bool:
    """The Trainer autocasts matrix products to bf16/fp16 in mixed precision, except under DeepSpeed, which
    converts the model itself."""
    return runtime.precision != "fp32" and not cfg.deepspeed


def report_to(cfg: Config) -> list[str] | str:
    """The experiment trackers the Trainer logs to; "none" turns off transformers' own default choice."""
    trackers = (["wandb"] if cfg.uses_wandb else []) + (["tensorboard"] if cfg.use_tensorboard else [])
    return trackers or "none"


def liger_settings(cfg: Config, runtime: RuntimeSettings, head_has_token_rows: bool = False) -> dict[str, bool] | None:
    """The Liger kernels to apply (transformers' `liger_kernel_config`), or None for none. Liger's MLP kernel
    only where `mlp_forward` chose it (the fused LoRA MLP wins: model/kernel_choice.py). Liger's fused
    output head + loss reads the head's own weight (`lm_head.weight`), not its forward: that weight lacks the
    trained rows of added tokens (`head_has_token_rows`: the chunked loss, which applies them, takes its place
    then) and a LoRA adapter on the head (`adapts_output_head`: the plain loss, through the adapter)."""
    if not use_liger(cfg, runtime):
        return None
    settings = {**cfg.liger_kernel_config, **liger_mlp_settings(mlp_forward(cfg, runtime))}
    if head_has_token_rows or cfg.adapts_output_head:
        settings["fused_linear_cross_entropy"] = False
    return settings


def liger_fuses_loss(settings: dict[str, bool] | None) -> bool:
    return settings is not None and settings.get("fused_linear_cross_entropy", True)


def cpu_without_deepspeed(cfg: Config, runtime: RuntimeSettings) -> bool:
    """accelerate's CPU flag: it makes a CPU torchrun distributed over gloo, but it also bypasses the
    DeepSpeed set-up, which DeepSpeed on CPUs needs."""
    return runtime.device == "cpu" and not cfg.deepspeed


def checkpointing_kwargs(cfg: Config, runtime: RuntimeSettings) -> dict[str, Any]:
    """transformers' activation-checkpointing options: `torch.utils.checkpoint` arguments, which layers
    (`every_n_layers`) and where the saved layer inputs live (`offload`: pinned CPU memory, on a GPU; on the
    CPU they are there already)."""
    kwargs = dict(cfg.gradient_checkpointing_kwargs or {})
    if cfg.gradient_checkpointing_layers > 1:
        kwargs["every_n_layers"] = cfg.gradient_checkpointing_layers
    if cfg.offloads_activations and runtime.device == "cuda":
        kwargs["offload"] = True
    return kwargs


def scheduler_settings(cfg: Config) -> tuple[str, dict[str, Any] | None]:
    """transformers' scheduler name and arguments. `cosine_min_lr_ratio` is transformers' `cosine_with_min_lr`
    (its `min_lr_rate`); with `cosine_constant_lr_ratio` as well, DolphinTrainer builds the schedule itself
    (train/schedule.py) and these stay as the description of its decay."""
    if cfg.cosine_min_lr_ratio is None:
        return cfg.lr_scheduler, cfg.lr_scheduler_kwargs
    return "cosine_with_min_lr", {**(cfg.lr_scheduler_kwargs or {}), "min_lr_rate": cfg.cosine_min_lr_ratio}


def _checkpointing_argument(arguments_class: Any) -> str:
    """transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing`."""
    params = inspect.signature(arguments_class.__init__).parameters
    return "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"


def _sequential_sampling(arguments_class: Any) -> str:
    """Curriculum learning: the Trainer reads the rows in their order (packed rows are in order too:
    data/packing.py). transformers' own sampler option, which older releases lack."""
    if "train_sampling_strategy" not in inspect.signature(arguments_class.__init__).parameters:
        raise EnvironmentProblem("curriculum_sampling needs transformers' train_sampling_strategy: upgrade it")
    return "sequential"


def build_training_arguments(
    cfg: Config, runtime: RuntimeSettings, schedule: TrainingSchedule, liger: dict[str, bool] | None = None
) -> Any:
    """`liger`: the kernels `liger_settings` chose (None: no Liger)."""
    from transformers import TrainingArguments

    has_eval = schedule.eval_steps is not None or cfg.val_set_size > 0
    optional = {
        k: v
        for k, v in {
            "adam_beta1": cfg.adam_beta1,
            "adam_beta2": cfg.adam_beta2,
            "adam_epsilon": cfg.adam_epsilon,
            "save_total_limit": cfg.save_total_limit,
        }.items()
        if v is not None
    }
    if deepspeed_on_cpu(cfg, runtime):
        optional["accelerator_config"] = {"use_configured_state": True}  # built by the recipe's environment set-up
    scheduler, scheduler_kwargs = scheduler_settings(cfg)
    if scheduler_kwargs is not None:
        optional["lr_scheduler_kwargs"] = scheduler_kwargs
    if cfg.curriculum_sampling:
        optional["train_sampling_strategy"] = _sequential_sampling(TrainingArguments)
    checkpointing = _checkpointing_argument(TrainingArguments)
    optional[checkpointing] = cfg.checkpointing
    if liger:
        optional["liger_kernel_config"] = liger
    if cfg.checkpointing and (kwargs := checkpointing_kwargs(cfg, runtime)):
        optional[f"{checkpointing}_kwargs"] = kwargs
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=schedule.batch.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size_for_eval,
        gradient_accumulation_steps=schedule.batch.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=schedule.total_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=scheduler,
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
        save_only_model=cfg.save_only_model,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to(cfg),
        run_name=cfg.wandb_name,
        deepspeed=deepspeed_config(cfg),
        fsdp=cfg.fsdp or "",
        fsdp_config=fsdp_settings(cfg),
        # Our rows carry only what the model needs; the column check would drop position_ids.
        remove_unused_columns=False,
        # The loss is the mean over every trainable token of the global batch, on any number of processes.
        average_tokens_across_devices=True,
        # Tokens are counted by our throughput meter, read once per log: transformers' count reads each micro
        # batch's back from the GPU, a wait for the device every micro batch.
        include_num_input_tokens_seen="no",
        # Only the loss is needed from evaluation; gathering logits would cost tokens x vocabulary memory.
        prediction_loss_only=True,
        # Log the loss as it is: the default filter replaces NaN/inf by an average and hides divergence.
        logging_nan_inf_filter=False,
        use_liger_kernel=liger is not None,
        **optional,
    )
