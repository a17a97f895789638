"""FSDP (FSDP2) over 2 CPU processes (gloo): the loss curve matches one process on the same global
batches, and the saved model is whole (consolidated, no empty shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.slow


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_fsdp_two_processes_match_one_process_and_save_a_whole_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    common = {"max_steps": 4, "save_steps": 4, "sample_packing": True, "learning_rate": 1e-3,
              "dataset_prepared_path": str(tmp_path / "prepared")}  # fmt: skip
    one = write_config(tmp_path / "one.yml", tiny_config(tmp_path / "one", micro_batch_size=4, **common))
    result = subprocess.run([sys.executable, "-m", "dolphin_train", str(one)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    # The sharded run computes the chunked loss in the output head's forward, where FSDP gathers its weight.
    sharded = tiny_config(tmp_path / "two", micro_batch_size=2, fsdp=["full_shard", "auto_wrap"],
                          chunked_cross_entropy=True, **common)  # fmt: skip
    two = write_config(tmp_path / "two.yml", sharded)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dolphin_train", str(two)]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP" in result.stdout  # the plan names the sharding
    assert "Chunked cross-entropy: the full logits" in result.stdout + result.stderr

    # Same global batch (2 processes x 2 rows = 4 rows) at each step: the same losses, to float rounding.
    assert _losses(tmp_path / "two/out") == pytest.approx(_losses(tmp_path / "one/out"), rel=1e-4)
    weights = load_file(str(tmp_path / "two/out/model.safetensors"))
    reference = load_file(str(tmp_path / "one/out/model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.numel() > 0 for v in weights.values())
