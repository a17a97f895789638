"""What a person sees: at default verbosity no library chatter, `-v` adds debug logging, and a mistake is
one `error:` message with a non-zero exit, never a traceback. Run as the user runs it, in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, sharegpt, tiny_config, write_config, write_jsonl

# Library warning spam (Python warnings, deprecation notices, logged warnings), case-insensitive.
SPAM = re.compile(r"warn|deprecat", re.IGNORECASE)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", COLUMNS="200")
    for quieting in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):  # set by conftest; a user has neither
        env.pop(quieting, None)
    cmd = [sys.executable, "-m", "dolphin_train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _spam(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if SPAM.search(line)]


@pytest.mark.slow
def test_embedded_default_run_output_is_clean(tmp_path: Path) -> None:
    result = _run(
        str(REPO / "configs/tiny-chat.yml"), "--max_steps", "3", "--logging_steps", "1",
        "--output_dir", str(tmp_path / "out"), "--dataset_prepared_path", str(tmp_path / "prepared"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert _spam(result) == []
    assert "DEBUG" not in result.stdout + result.stderr
    assert "Run overview" in result.stdout and "Done: 3 steps" in result.stdout
    # The progress bar (stderr) carries the latest loss and throughput; log lines still reach stdout.
    assert re.search(r"3/3 \[.*loss [0-9.]+, tok/s [0-9,]+", result.stderr)
    assert "'loss':" in result.stdout


@pytest.mark.slow
def test_verbose_shows_debug_logging(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path))
    verbose, quiet = _run("preprocess", str(path), "-v"), _run("preprocess", str(path))  # quiet: from the cache
    assert quiet.returncode == 0 and verbose.returncode == 0, verbose.stderr[-3000:]
    assert "DEBUG" not in quiet.stdout + quiet.stderr and _spam(quiet) == []
    assert re.search(r"DEBUG .*Read and checked 400 rows", verbose.stdout)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_bad_config_is_one_error_message_and_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, learnig_rate=1e-3))
    result = _run(str(path))
    assert result.returncode == 2
    assert _error_lines(result) == [f"error: {path}: 1 problem"]
    assert "did you mean `learning_rate`" in result.stderr
    assert "Traceback" not in result.stderr and _spam(result) == []


@pytest.mark.slow
def test_malformed_row_is_one_error_message_and_exit_1(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [sharegpt(("human", "Hi"), ("gpt", "Hello.")), '{"conversations": ['])
    result = _run(str(write_config(tmp_path / "c.yml", tiny_config(tmp_path, data))))
    assert result.returncode == 1
    assert len(_error_lines(result)) == 1
    assert f"{data}:2: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr and _spam(result) == []
