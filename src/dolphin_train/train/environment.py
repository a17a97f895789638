"""The process environment a run needs before transformers builds anything: tracker settings, DeepSpeed's
accelerator, and accelerate's state for DeepSpeed over CPU processes. Called by the recipe, once, before
`build_training_arguments` (which itself only maps config to arguments)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.errors import EnvironmentProblem


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
    if cfg.uses_wandb and "WANDB_DIR" not in os.environ:
        env["WANDB_DIR"] = cfg.output_dir  # runs (offline ones too) live next to the model they trained
    if cfg.wandb_run_id:
        env["WANDB_RESUME"] = "allow"
    return env


def deepspeed_environment(runtime: RuntimeSettings) -> dict[str, str]:
    """accelerate imports DeepSpeed whenever it is installed, and DeepSpeed then warns on every CPU-only
    machine that it could not detect an accelerator. Naming the accelerator we chose says the same, quietly."""
    if runtime.device == "cpu" and "DS_ACCELERATOR" not in os.environ:
        return {"DS_ACCELERATOR": "cpu"}
    return {}


def tensorboard_installed() -> bool:
    """transformers' TensorBoard callback writes through torch.utils.tensorboard (the `tensorboard` package)
    or, failing that, tensorboardX."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def check_trackers(cfg: Config) -> None:
    """Fail before any data is prepared, rather than when the Trainer is built."""
    if cfg.use_tensorboard and not tensorboard_installed():
        raise EnvironmentProblem("use_tensorboard: true, but TensorBoard is not installed: pip install tensorboard")


def deepspeed_on_cpu(cfg: Config, runtime: RuntimeSettings) -> bool:
    return bool(cfg.deepspeed) and runtime.device == "cpu"


def configure_deepspeed_on_cpu() -> None:
    """DeepSpeed over CPU processes (gloo). TrainingArguments would build accelerate's state without a
    backend on a machine with no GPU, so that accelerate counts one process while DeepSpeed counts all of
    them. We build the state ourselves, the way TrainingArguments does for DeepSpeed (the same
    environment flag) but with the gloo backend; TrainingArguments then uses it (`use_configured_state`)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def set_up_process_environment(cfg: Config, runtime: RuntimeSettings) -> None:
    check_trackers(cfg)
    if deepspeed_on_cpu(cfg, runtime) and runtime.world_size == 1:
        raise EnvironmentProblem(
            "deepspeed on the CPU runs over several processes: launch with `--num-processes 2` (or torchrun "
            "--nproc_per_node 2), or remove `deepspeed` for a single process"
        )
    if runtime.world_size % cfg.cp_size:
        raise EnvironmentProblem(
            f"context_parallel_size: {cfg.cp_size} must divide the {runtime.world_size} processes launched "
            f"(data-parallel size x context_parallel_size = world size): launch a multiple of {cfg.cp_size} "
            "processes, or lower context_parallel_size"
        )
    if cfg.optimizer_in_backward and runtime.world_size > 1:
        raise EnvironmentProblem(
            f"optimizer_in_backward is a single-process mode ({runtime.world_size} processes were started): each "
            "process would update its weights before the gradients are averaged; launch one process, or use "
            "DeepSpeed ZeRO or FSDP to share the memory across GPUs"
        )
    os.environ.update(wandb_environment(cfg))
    os.environ.update(deepspeed_environment(runtime))
    if cfg.uses_wandb:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if deepspeed_on_cpu(cfg, runtime):
        configure_deepspeed_on_cpu()
