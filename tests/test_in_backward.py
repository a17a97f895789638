"""The optimizer step in the backward pass (`optimizer_in_backward`): the same updates as the usual step,
gradients freed as soon as they are used, what it cannot combine with refused, and in its one-GPU setting
(bf16 weights, torchao's 8-bit AdamW with stochastic rounding) a loss curve that follows float32 master
weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError

pytestmark = pytest.mark.slow


def _train(tmp_path: Path, steps: int, **keys) -> tuple[list[float], dict[str, torch.Tensor], object]:
    from dolphin_train.recipe import set_up_run

    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_steps=steps, sample_packing=True,
                      micro_batch_size=2, sequence_len=256, max_grad_norm=0.0, **keys)  # fmt: skip
    run = set_up_run(validate_mapping(raw))
    run.trainer.train()
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    weights = {n: p.detach().float().clone() for n, p in run.trainer.model.named_parameters()}
    return losses, weights, run.trainer


def test_updates_in_the_backward_pass_are_the_usual_updates(tmp_path: Path) -> None:
    """float32 weights and torch's AdamW, per parameter from the backward pass against the Trainer's own
    step: the same loss at every step and the same weights (the schedule, weight decay groups and the
    optimizer state all carry over), with no gradient left after a step."""
    keys = {"optimizer": "adamw_torch", "weight_decay": 0.1, "warmup_steps": 3}
    usual, usual_weights, _ = _train(tmp_path / "usual", 20, **keys)
    fused, fused_weights, trainer = _train(tmp_path / "fused", 20, optimizer_in_backward=True, **keys)
    assert fused == pytest.approx(usual, rel=1e-5)
    for name, weight in usual_weights.items():
        torch.testing.assert_close(fused_weights[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    assert all(p.grad is None for p in trainer.model.parameters())  # freed as soon as used
    assert type(trainer.optimizer.optimizer).__name__ == "OptimizerInBackward"


@pytest.mark.parametrize(("keys", "said"), [
    ({"gradient_accumulation_steps": 2}, "so gradients cannot accumulate"),
    ({"max_grad_norm": 1.0}, "before the global gradient norm is known: set max_grad_norm: 0"),
    ({"optimizer": "adafactor"}, "optimizer_in_backward with optimizer: adafactor: use one of"),
    ({"fsdp": ["full_shard"]}, "it is a single-GPU mode"),
])  # fmt: skip
def test_what_cannot_work_with_it_is_refused_at_load(tmp_path: Path, keys: dict, said: str) -> None:
    raw = tiny_config(tmp_path, optimizer_in_backward=True, optimizer="adamw_torch_8bit", max_grad_norm=0.0)
    with pytest.raises(ConfigError, match=said):
        validate_mapping({**raw, **keys})


SMALL_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 16}


def _window_means(losses: list[float], width: int = 20) -> list[float]:
    return [sum(losses[i : i + width]) / len(losses[i : i + width]) for i in range(0, len(losses), width)]


def test_bf16_weights_with_stochastic_rounding_follow_the_float32_master_curve(tmp_path: Path) -> None:
    """The one-GPU setting (bf16 weights, no float32 master copy, torchao's 8-bit AdamW rounding each update
    stochastically, stepped in the backward pass) against float32 weights and torch's AdamW, over 200 steps:
    every 20-step mean loss within 2%. Measured on this model: at most 0.16% with stochastic rounding, where
    rounding to nearest (bitsandbytes' 8-bit AdamW, same mode) drifts 8.5% and bf16 weights with torch's
    AdamW 10%: the small updates lost to bf16's precision, which this test exists to catch, grow with the
    steps (1.8% and 2.4% after 100), so 2% sits an order of magnitude above the one and well below the others."""
    keys = {"model_config_overrides": SMALL_MODEL, "learning_rate": 1e-3}
    reference, _, _ = _train(tmp_path / "fp32", 200, **keys)
    rounded, _, trainer = _train(tmp_path / "bf16", 200, bfloat16=True, optimizer_in_backward=True,
                                 optimizer="adamw_torch_8bit", **keys)  # fmt: skip
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert len(rounded) == len(reference) == 200 and reference[-1] < 0.75 * reference[0]
    for got, want in zip(_window_means(rounded), _window_means(reference), strict=True):
        assert got == pytest.approx(want, rel=0.02)
