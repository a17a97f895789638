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
    """Two processes over gloo, one epoch with accumulation: rank 0 prepares the data once and rank 1 loads
    rank 0's cache entry (each rank's own log, through torchrun's --tee, says which); both train the number
    of steps `plan --gpus 2` announces."""
    from dolphin_train.config.load import load_config
    from dolphin_train.plan.report import make_plan

    cfg = tiny_config(tmp_path, num_epochs=1, sample_packing=True, micro_batch_size=2, gradient_accumulation_steps=2,
                      val_set_size=0.1)  # fmt: skip
    path = write_config(tmp_path / "c.yml", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--tee", "3", "-m", "dolphin_train",
           str(path), "-v"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == make_plan(load_config(path), gpus=2, gpu_memory=10**12, device="cpu").data.total_steps
    rank = {r: [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(f"[default{r}]:")]
            for r in (0, 1)}  # fmt: skip
    said = {r: "\n".join(lines) for r, lines in rank.items()}
    assert "Prepared data saved to" in said[0] and "Reusing prepared data from" not in said[0]
    assert "Reusing prepared data from" in said[1] and "Prepared data saved to" not in said[1]
    assert "Tokenizing with" not in said[1]  # rank 1 never tokenized
    # Prepared once, cached once, no temporary directory left behind.
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == [summary["data_fingerprint"]]
    assert said[0].count("Run overview") == 1 and "Run overview" not in said[1]  # rank 0 alone prints it


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
    assert not (tmp_path / "out/.dolphin-train.lock").exists()  # rank 0 held the output_dir's lock, then let it go
