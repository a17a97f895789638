"""Launchers: `python -m dolphin_train` and `torchrun -m dolphin_train` (2 CPU processes over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    return env


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, max_steps=2))
    result = subprocess.run(
        [sys.executable, "-m", "dolphin_train", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out/run_summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=3, sample_packing=True, micro_batch_size=2, val_set_size=0.1)
    path = write_config(tmp_path / "c.yml", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dolphin_train", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    # Prepared once (by rank 0), cached once, no temporary directory left behind.
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == [summary["data_fingerprint"]]
    assert result.stdout.count("Run overview") == 1  # the summary is printed by rank 0 only


@pytest.mark.slow
def test_num_processes_relaunches_under_torchrun(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, max_steps=2, sample_packing=True))
    cmd = [sys.executable, "-m", "dolphin_train", str(path), "--num-processes", "2", "--learning_rate", "3e-4"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    args = json.loads((tmp_path / "out/checkpoint-2/trainer_state.json").read_text())
    assert args["log_history"][0]["learning_rate"] < 3e-4 + 1e-12  # the override reached both processes
