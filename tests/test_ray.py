"""`use_ray: true`: the run launched as Ray Train workers, two CPU processes joined over gloo, as a user runs it
(`dolphin-train CONFIG`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError
from dolphin_train.ray_launch import config_for_workers


def test_the_workers_get_the_config_the_launcher_validated(tmp_path: Path) -> None:
    cfg = validate_mapping(tiny_config(tmp_path, use_ray=True, ray_num_workers=2, batch_size=4, micro_batch_size=2,
                                       resources_per_worker={"CPU": 1}))  # fmt: skip
    assert validate_mapping(config_for_workers(cfg)) == cfg


def test_ray_keys_need_use_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ray_num_workers: no effect without use_ray: true"):
        validate_mapping(tiny_config(tmp_path, ray_num_workers=2))


@pytest.mark.slow
def test_two_ray_workers_train_as_one_run(tmp_path: Path) -> None:
    pytest.importorskip("ray.train")
    raw = tiny_config(tmp_path, use_ray=True, ray_num_workers=2, resources_per_worker={"CPU": 1}, max_steps=3,
                      micro_batch_size=2, ray_run_name="tiny")  # fmt: skip
    config = write_config(tmp_path / "c.yml", raw)
    done = subprocess.run([sys.executable, "-m", "dolphin_train", str(config)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (tmp_path / "out/model.safetensors").exists()
    assert (tmp_path / "out/ray/tiny").is_dir()
    assert not (tmp_path / "out/.dolphin-train.lock").exists()  # the main worker held the lock, then let it go
    assert "Done: 3 steps" in done.stdout
    assert "(RayTrainWorker pid=" in done.stdout and "\x1b[" not in done.stdout  # plain text in a log file
