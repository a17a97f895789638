"""axolotl's cosine keys: `cosine_min_lr_ratio` (transformers' cosine_with_min_lr) and
`cosine_constant_lr_ratio` (the cosine ends early and the minimum holds to the end), checked through the
scheduler the Trainer really builds, against the formula computed by hand."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from dolphin_train.config.load import validate_mapping
from dolphin_train.config.resolve import resolve_runtime
from dolphin_train.errors import ConfigError
from dolphin_train.train.arguments import build_training_arguments
from dolphin_train.train.schedule import compute_schedule, cosine_then_constant_factor

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}], "learning_rate": 1e-3, "bf16": False}
TOTAL, WARMUP = 20, 4


def _learning_rates(tmp_path: Any, **keys: Any) -> list[float]:
    """The learning rate at every step of a real DolphinTrainer's scheduler (tiny model, no data)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.recipe import _cosine_then_constant
    from dolphin_train.train.trainer import DolphinTrainer

    cfg = validate_mapping({**BASE, "output_dir": str(tmp_path), "max_steps": TOTAL, "warmup_steps": WARMUP, **keys})
    schedule = compute_schedule(cfg, rows=100, world_size=1, has_eval=False)
    args = build_training_arguments(cfg, resolve_runtime(cfg), schedule)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    trainer = DolphinTrainer(model=model, args=args, lr_schedule=_cosine_then_constant(cfg, schedule))
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL)
    rates = []
    for _ in range(TOTAL + 1):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


def _by_hand(step: int, min_ratio: float, decay_end: int) -> float:
    """Linear warmup, then a half cosine from 1e-3 to 1e-3 x min_ratio reached at `decay_end`, flat after."""
    if step < WARMUP:
        return 1e-3 * step / WARMUP
    progress = min(1.0, (step - WARMUP) / (decay_end - WARMUP))
    return 1e-3 * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_cosine_min_lr_ratio_decays_to_the_ratio(tmp_path: Any) -> None:
    rates = _learning_rates(tmp_path, cosine_min_lr_ratio=0.1)
    for step in (0, 2, 4, 9, 12, 19, 20):
        assert rates[step] == pytest.approx(_by_hand(step, 0.1, TOTAL), rel=1e-9, abs=1e-15), step
    assert rates[TOTAL] == pytest.approx(1e-4)  # the floor, not 0
    assert min(rates[WARMUP:]) == pytest.approx(1e-4)


def test_cosine_constant_lr_ratio_holds_the_minimum_after_its_fraction(tmp_path: Any) -> None:
    rates = _learning_rates(tmp_path, cosine_min_lr_ratio=0.2, cosine_constant_lr_ratio=0.5)
    decay_end = int(TOTAL * 0.5)
    assert rates[7] == pytest.approx(1e-3 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 3 / 6))))  # 3 of 6 decay steps
    for step in (0, 3, 4, 7, 9, 10, 15, 20):
        assert rates[step] == pytest.approx(_by_hand(step, 0.2, decay_end), rel=1e-9, abs=1e-15), step
    assert rates[decay_end:] == pytest.approx([2e-4] * (TOTAL + 1 - decay_end))


def test_cosine_then_constant_matches_transformers_cosine_with_min_lr_until_it_ends() -> None:
    """Before the minimum, the schedule is transformers' cosine_with_min_lr over the shortened span."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 3, 12, min_lr_rate=0.25)
    for step in range(12):
        expected = reference.lr_lambdas[0](step)
        assert cosine_then_constant_factor(step, 3, 24, 0.25, 0.5) == pytest.approx(expected), step


def test_axolotl_zero_constant_ratio_is_the_plain_min_lr_cosine(tmp_path: Any) -> None:
    """axolotl reads `cosine_constant_lr_ratio: 0` as unset (llama-3/3b-fp8-fsdp2.yaml writes it)."""
    assert _learning_rates(tmp_path, cosine_min_lr_ratio=0.1, cosine_constant_lr_ratio=0) == pytest.approx(
        _learning_rates(tmp_path, cosine_min_lr_ratio=0.1)
    )


def test_min_lr_ratio_goes_to_transformers_scheduler_arguments() -> None:
    cfg = validate_mapping({**BASE, "cosine_min_lr_ratio": 0.3, "lr_scheduler_kwargs": {"num_cycles": 0.5}})
    args = build_training_arguments(cfg, resolve_runtime(cfg), compute_schedule(cfg, 10, 1, has_eval=False))
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"num_cycles": 0.5, "min_lr_rate": 0.3}
    plain = validate_mapping(BASE)
    args = build_training_arguments(plain, resolve_runtime(plain), compute_schedule(plain, 10, 1, has_eval=False))
    assert str(args.lr_scheduler_type.value) == "cosine"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"cosine_min_lr_ratio": 0.1, "lr_scheduler": "linear"}, "lr_scheduler is linear"),
        ({"cosine_constant_lr_ratio": 0.8}, "set cosine_min_lr_ratio too"),
        ({"cosine_min_lr_ratio": 1.5}, "cosine_min_lr_ratio"),
        ({"cosine_min_lr_ratio": 0.1, "cosine_constant_lr_ratio": 0.8, "lr_scheduler_kwargs": {"x": 1}},
         "takes no lr_scheduler_kwargs"),
    ],
)  # fmt: skip
def test_cosine_keys_are_refused_where_they_would_do_nothing(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_mapping({**BASE, **keys})
