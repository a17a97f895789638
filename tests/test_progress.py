"""The training progress bar: transformers' bar with the latest loss and throughput as its postfix."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.recipe import set_up_run
from dolphin_train.train.progress import TrainingProgress, postfix_text


def _state(main: bool = True, step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=main, max_steps=10, global_step=step)


def test_bar_shows_steps_loss_and_tokens_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    progress = TrainingProgress()
    state = _state()
    progress.on_train_begin(None, state, None)
    state.global_step = 3
    progress.on_step_end(None, state, None)
    progress.on_log(None, state, None, logs={"loss": 1.23456, "learning_rate": 1e-4, "tokens_per_second": 5678})
    bar = progress.training_bar
    assert bar.postfix == "loss 1.235, tok/s 5,678"
    assert "3/10" in str(bar) and "loss 1.235, tok/s 5,678" in str(bar)
    # An evaluation log adds the eval loss and keeps the last training figures.
    progress.on_log(None, state, None, logs={"eval_loss": 0.98765, "eval_runtime": 0.1})
    assert bar.postfix == "loss 1.235, tok/s 5,678, eval loss 0.9877"
    progress.on_train_end(None, state, None)
    out = capsys.readouterr().out
    # Log lines are still written (above the bar), one per log.
    assert "'loss': '1.235'" in out and "'eval_loss': '0.9877'" in out


def test_only_the_main_process_draws_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    progress = TrainingProgress()
    state = _state(main=False)
    progress.on_train_begin(None, state, None)
    progress.on_log(None, state, None, logs={"loss": 1.0, "tokens_per_second": 10})
    assert progress.training_bar is None and progress.latest == {}
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_postfix_text_without_figures_is_empty() -> None:
    assert postfix_text({}) == ""
    assert postfix_text({"tokens_per_second": 1234567.0}) == "tok/s 1,234,567"


def test_the_trainer_uses_this_bar_and_adds_throughput_to_its_logs(tmp_path: Path) -> None:
    from transformers import ProgressCallback

    run = set_up_run(validate_mapping(tiny_config(tmp_path, max_steps=2)))
    callbacks = run.trainer.callback_handler.callbacks
    bars = [cb for cb in callbacks if isinstance(cb, ProgressCallback)]
    assert len(bars) == 1 and isinstance(bars[0], TrainingProgress)
    assert run.trainer.args.disable_tqdm is False  # shown although transformers' logging is quiet
    run.trainer.train()
    # The Trainer adds tokens_per_second to the logs itself, before any callback reads them.
    assert bars[0].latest.get("tokens_per_second", 0) > 0
