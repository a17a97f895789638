"""FSDP (FSDP2) over 2 CPU processes (gloo): the loss curve matches one process on the same global
batches, and the saved model is whole (consolidated, no empty shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.slow


FSDP = ["full_shard", "auto_wrap"]
SGD_STEP = {"max_steps": 1, "save_steps": 1, "optimizer": "sgd", "learning_rate": 100.0, "max_grad_norm": 0.0,
            "weight_decay": 0.0, "sample_packing": False}  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _train(config: Path, processes: int) -> None:
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                         "--nproc_per_node", str(processes)]  # fmt: skip
    result = subprocess.run([*launcher, "-m", "dolphin_train", str(config)], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_fsdp_first_step_applies_the_single_process_gradient(tmp_path: Path) -> None:
    """One plain SGD step shows the gradient itself in the weights (see test_deepspeed.py): 2 processes x 2
    unpacked rows of unequal lengths under FSDP must apply the gradient of 1 process x 4 rows."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model")).save_pretrained(base)
    common = {**SGD_STEP, "dataset_prepared_path": str(tmp_path / "prepared"), "base_model": str(base),
              "train_from_scratch": False, "chunked_cross_entropy": True}  # fmt: skip
    _train(write_config(tmp_path / "one.yml", tiny_config(tmp_path / "one", micro_batch_size=4, **common)), 1)
    sharded = tiny_config(tmp_path / "two", micro_batch_size=2, fsdp=FSDP, **common)
    _train(write_config(tmp_path / "two.yml", sharded), 2)
    initial = load_file(str(base / "model.safetensors"))
    single, two = (load_file(str(tmp_path / run / "out/model.safetensors")) for run in ("one", "two"))
    assert single.keys() == two.keys()
    for name, weight in single.items():
        reference = initial.get(name)
        update = weight - reference if reference is not None and reference.shape == weight.shape else weight
        tolerance = 1e-4 * float(update.abs().max()) + 1e-7
        torch.testing.assert_close(two[name], weight, rtol=0, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")


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
    assert weights.keys() == reference.keys()  # consolidated: every tensor whole, with the values of one process
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fsdp_lora_trains_the_new_tokens_rows_as_one_process_does(tmp_path: Path) -> None:
    """LoRA with the two ChatML tokens added: under FSDP on 2 processes only their rows of the embedding and
    the head train next to the adapter, and one SGD step leaves the rows and the adapter as on one process."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model")).save_pretrained(base)
    common = {**SGD_STEP, "learning_rate": 10.0, "dataset_prepared_path": str(tmp_path / "prepared"),
              "base_model": str(base), "train_from_scratch": False, "adapter": "lora", "lora_r": 4,
              "chunked_cross_entropy": True}  # fmt: skip
    _train(write_config(tmp_path / "one.yml", tiny_config(tmp_path / "one", micro_batch_size=4, **common)), 1)
    sharded = tiny_config(tmp_path / "two", micro_batch_size=2, fsdp=FSDP, **common)
    _train(write_config(tmp_path / "two.yml", sharded), 2)
    single, two = (load_file(str(tmp_path / run / "out/adapter_model.safetensors")) for run in ("one", "two"))
    rows = [k for k in single if "trainable_tokens_delta" in k]
    assert len(rows) == 2 and all(single[k].shape[0] == 2 for k in rows)  # the 2 new tokens, embedding and head
    # Both rows start at the mean of the others; trained, they part.
    assert all(not torch.allclose(single[k][0], single[k][1]) for k in rows)
    assert single.keys() == two.keys()
    for name, value in single.items():
        torch.testing.assert_close(two[name], value, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
