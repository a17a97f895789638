"""What a run prints while it trains: one bar on a terminal, one formatted line per log step and per
evaluation, and in a log file (no terminal) lines that carry the elapsed time and the ETA instead of a bar."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from dolphin_train import terminal
from dolphin_train.cli import setup_logging
from dolphin_train.train.console import TrainingConsole, bar_postfix, duration, evaluation_line, training_line

LOGS = {"loss": 1.234567, "learning_rate": 1.95e-4, "grad_norm": 1.254, "tokens_per_second": 5415.2, "mfu": 0.3124,
        "epoch": 0.5, "num_input_tokens_seen": 1000}  # fmt: skip


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _state(step: int = 0, main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=main, max_steps=160, global_step=step)


def test_a_training_log_is_one_formatted_line() -> None:
    line = training_line(12, 160, LOGS)
    assert line == "step  12/160  loss 1.2346  lr 1.950e-04  grad norm 1.25  tok/s 5,415  MFU 31.2%"
    assert training_line(3, 3, {"loss": 2.0}) == "step 3/3  loss 2.0000"  # figures the log lacks are left out
    evaluation = evaluation_line(8, 160, {"eval_loss": 6.76954, "eval_runtime": 0.2429})
    assert evaluation == "step   8/160  eval loss 6.7695  (0.2 s)"
    assert bar_postfix(LOGS) == "loss 1.2346, tok/s 5,415"


def test_durations_read_as_hours_minutes_seconds() -> None:
    assert duration(0) == "0:00:00" and duration(125.4) == "0:02:05" and duration(3 * 3600 + 61) == "3:01:01"
    assert duration(float("nan")) == "?"


def test_without_a_terminal_each_line_carries_elapsed_time_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0, 130.0])  # train begins, then 10 s and 30 s later
    monkeypatch.setattr("dolphin_train.train.console.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    console = TrainingConsole(bar=False, out=out)
    console.on_train_begin(None, _state(step=40), None)  # resumed at step 40 of 160
    console.on_log(None, _state(step=41), None, logs=dict(LOGS))
    console.on_log(None, _state(step=42), None, logs={"eval_loss": 1.5, "eval_runtime": 2.0})
    console.on_log(None, _state(step=42), None, logs={"train_runtime": 9.0, "train_loss": 1.2})  # not shown
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step  41/160  loss 1.2346") and lines[0].endswith("elapsed 0:00:10  ETA 0:19:50")
    assert lines[1] == "step  42/160  eval loss 1.5000  (2.0 s)"
    assert len(lines) == 2 and "\r" not in out.getvalue() and "{" not in out.getvalue()


def test_on_a_terminal_one_bar_with_the_lines_written_above_it(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    console = TrainingConsole(bar=True, out=out)
    console.on_train_begin(None, _state(), None)
    state = _state(step=3)
    console.on_step_end(None, state, None)
    console.on_log(None, state, None, logs=dict(LOGS))
    assert console.bar.n == 3 and console.bar.postfix == "loss 1.2346, tok/s 5,415"
    console.on_train_end(None, state, None)
    expected = "step   3/160  loss 1.2346  lr 1.950e-04  grad norm 1.25  tok/s 5,415  MFU 31.2%"
    assert out.getvalue().splitlines() == [expected]


def test_other_processes_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    console = TrainingConsole(bar=True, out=out)
    console.on_train_begin(None, _state(main=False), None)
    console.on_log(None, _state(main=False), None, logs=dict(LOGS))
    assert console.bar is None and out.getvalue() == ""
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.fixture
def root_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging replaces the root logger's handlers and sets a few variables: put them back after."""
    root, ours = logging.getLogger(), logging.getLogger("dolphin_train")
    handlers, levels = root.handlers[:], (root.level, ours.level)
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    terminal.set_verbose(False)


def _log_on_a_terminal(monkeypatch: pytest.MonkeyPatch, verbose: bool) -> str:
    from rich.console import Console

    monkeypatch.setattr(terminal, "bars_wanted", lambda: True)
    setup_logging(verbose)
    [handler] = logging.getLogger().handlers
    out = io.StringIO()
    handler.console = Console(file=out, force_terminal=True, width=200)  # a terminal, as rich sees one
    logging.getLogger("dolphin_train.recipe").info("Attention: sdpa (PyTorch SDPA)")
    return ANSI.sub("", out.getvalue())


@pytest.mark.usefixtures("root_logging")
def test_on_a_terminal_a_log_line_says_its_level_once_then_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    [line] = _log_on_a_terminal(monkeypatch, verbose=False).splitlines()
    assert line.rstrip() == "INFO     Attention: sdpa (PyTorch SDPA)"


@pytest.mark.usefixtures("root_logging")
def test_on_a_terminal_the_loggers_name_only_with_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    [line] = _log_on_a_terminal(monkeypatch, verbose=True).splitlines()
    assert line.startswith("INFO     dolphin_train.recipe: Attention: sdpa (PyTorch SDPA)")
    assert line.count("INFO") == 1


@pytest.mark.usefixtures("root_logging")
def test_in_a_log_file_one_plain_line_per_message(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(terminal, "bars_wanted", lambda: False)
    log = logging.getLogger("dolphin_train.recipe")
    setup_logging(False)
    log.info("Attention: sdpa (PyTorch SDPA)")
    log.warning("a warning")
    setup_logging(True)
    log.info("Attention: sdpa (PyTorch SDPA)")
    assert capsys.readouterr().out.splitlines() == [
        "INFO     Attention: sdpa (PyTorch SDPA)",
        "WARNING  a warning",
        "INFO     dolphin_train.recipe: Attention: sdpa (PyTorch SDPA)",
    ]
