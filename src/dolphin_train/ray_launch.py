"""`use_ray: true`: the run launched as Ray Train workers (axolotl's keys: `ray_num_workers`, `ray_run_name`,
`resources_per_worker`).

Ray Train starts the workers, gives each its rank in the environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR) and joins them in one torch.distributed process group, which the run then uses as it uses
torchrun's (process_group.py reuses a group that exists). Each worker runs the same `run_training` as a
plain launch, on the config the launching process validated, so every worker decides alike.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dolphin_train.config.load import validate_mapping
from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError, EnvironmentProblem
from dolphin_train.process_group import world_size

log = logging.getLogger(__name__)


def worker_resources(cfg: Config) -> dict[str, float]:
    """`resources_per_worker`, by default one GPU each where this machine has one, else one CPU."""
    if cfg.resources_per_worker:
        return dict(cfg.resources_per_worker)
    import torch

    return {"GPU": 1} if torch.cuda.is_available() else {"CPU": 1}


def config_for_workers(cfg: Config) -> dict[str, Any]:
    """The keys the config set, as a mapping that validates to the same config (tested)."""
    return cfg.model_dump(mode="json", by_alias=True, exclude_unset=True)


def train_on_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray worker runs: the plain training run (whose main process writes `run_summary.json`)."""
    from dolphin_train.recipe import run_training

    run_training(validate_mapping(loop_config["config"]))


def run_with_ray(cfg: Config) -> dict[str, Any]:
    """Train on `ray_num_workers` Ray workers; the run's summary, as the main worker wrote it."""
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as e:
        raise EnvironmentProblem("use_ray: true needs Ray Train: pip install 'dolphin-train[ray]'") from e
    if world_size() > 1:
        raise EnvironmentProblem("use_ray: true: start one dolphin-train process (not torchrun or accelerate); "
                                 "Ray starts the ray_num_workers training processes")  # fmt: skip
    if not sys.stdout.isatty():  # Ray colours its workers' line prefixes; a log file should get plain text
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    resources = worker_resources(cfg)
    workers = cfg.ray_num_workers or 1
    log.info("Ray: %d worker(s), each with %s", workers, resources)
    trainer = TorchTrainer(
        train_on_worker,
        train_loop_config={"config": config_for_workers(cfg)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu="GPU" in resources, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.ray_run_name, storage_path=str(Path(cfg.output_dir, "ray").absolute())),
    )
    result = trainer.fit()
    if result.error is not None:
        raise DolphinError(f"the Ray workers failed: {result.error}")
    # Ray keeps the metrics a worker reports only with a checkpoint of its own; the run's summary file is on
    # the storage every worker shares.
    return json.loads(Path(cfg.output_dir, "run_summary.json").read_text())
