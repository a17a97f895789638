"""The exact step count, computed before training from the training rows: the Trainer runs that many steps,
and the scheduler's warmup and decay are laid out over them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config
from dolphin_train.config.load import load_config
from dolphin_train.plan.report import make_plan
from dolphin_train.recipe import set_up_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("keys", [
    {"num_epochs": 2, "gradient_accumulation_steps": 3, "micro_batch_size": 2, "sample_packing": True},
    {"num_epochs": 1.5, "gradient_accumulation_steps": 2, "micro_batch_size": 3, "val_set_size": 0.1},
], ids=["2 epochs, packed, accumulation 3", "1.5 epochs, unpacked, accumulation 2"])  # fmt: skip
def test_the_trainer_runs_the_planned_steps_and_the_schedule_spans_them(keys: dict, tmp_path: Path) -> None:
    from dolphin_train.cli import main

    rows = (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:60]  # a few steps per epoch
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    raw = tiny_config(tmp_path, data, warmup_steps=3, lr_scheduler="cosine", learning_rate=1e-3, sequence_len=256,
                      **keys)  # fmt: skip
    path = write_config(tmp_path / "c.yml", raw)
    assert main(["preprocess", str(path)]) == 0
    cfg = load_config(path)
    planned = make_plan(cfg, gpus=1, gpu_memory=10**12, device="cpu").data
    assert planned.exact
    run = set_up_run(cfg)
    assert run.schedule.total_steps == planned.total_steps
    # The micro-batches the Trainer's own data loader yields in an epoch are the ones the steps came from.
    assert len(run.trainer.get_train_dataloader()) == run.schedule.micro_batches_per_epoch
    run.trainer.train()
    assert run.trainer.state.global_step == planned.total_steps  # not one step more or fewer
    total, warmup = planned.total_steps, 3
    logged = {e["step"]: e["learning_rate"] for e in run.trainer.state.log_history if "learning_rate" in e}
    assert sorted(logged) == list(range(1, total + 1))
    for step, lr in logged.items():  # step k (from 1) runs at the rate after k - 1 scheduler steps
        done = step - 1
        decay = (done - warmup) / (total - warmup)
        expected = done / warmup if done < warmup else 0.5 * (1 + math.cos(math.pi * decay))
        assert lr == pytest.approx(1e-3 * expected, abs=1e-12), f"learning rate at step {step}"
    assert 0 < logged[total] < logged[total - 1]  # still decaying at the last step: it reaches 0 just after
