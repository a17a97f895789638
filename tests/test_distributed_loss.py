"""Across processes the loss is still the mean over every trainable token of the global batch:
2 processes x 2 accumulation steps give the gradients (and the logged loss) of 1 process x 4, and
evaluation on 2 processes gives the eval loss of 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_jsonl

PROBE = str(Path(__file__).with_name("grad_probe.py"))


def _run(tmp_path: Path, name: str, launcher: list[str], **overrides) -> dict:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    # 5 of the 16 conversations are held out: one process has a row fewer, so the other ranks must not
    # repeat one to keep in step (or it would count twice).
    cfg = tiny_config(tmp_path / name, data, max_steps=1, max_grad_norm=0.0, micro_batch_size=1, val_set_size=5,
                      **overrides)  # fmt: skip
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([*launcher, PROBE, str(config), str(out)], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_two_processes_with_accumulation_equal_one_process(tmp_path: Path) -> None:
    one = _run(tmp_path, "one", [sys.executable], gradient_accumulation_steps=4)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = _run(tmp_path, "two", torchrun, gradient_accumulation_steps=2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_generation_metrics_and_table_on_two_processes_equal_one(tmp_path: Path) -> None:
    """Each process generates for its share of the evaluation turns: the gathered scores and the summed
    perplexity are those of one process, and rank 0 writes the same table."""
    asked = {"do_causal_lm_eval": True, "eval_causal_lm_metrics": ["perplexity", "sacrebleu", "chrf"],
             "eval_table_size": 3, "eval_max_new_tokens": 4}  # fmt: skip
    one = _run(tmp_path, "one", [sys.executable], gradient_accumulation_steps=4, **asked)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = _run(tmp_path, "two", torchrun, gradient_accumulation_steps=2, **asked)
    for name in ("eval_perplexity", "eval_sacrebleu", "eval_chrf"):
        assert two["eval_metrics"][name] == pytest.approx(one["eval_metrics"][name], rel=1e-4), name
    tables = [(tmp_path / n / "out/eval_predictions/step-1.jsonl").read_text() for n in ("one", "two")]
    assert tables[0] == tables[1] and len(tables[0].splitlines()) == 3
