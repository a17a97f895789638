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


LIBRARY_BARS = ("Generating train split", "Saving the dataset", "Writing model shards", "Loading dataset")
DEFAULT_JOB = (str(REPO / "configs/tiny-chat.yml"), "--max_steps", "3", "--logging_steps", "1")


def _default_job_args(tmp_path: Path) -> tuple[str, ...]:
    return (*DEFAULT_JOB, "--output_dir", str(tmp_path / "out"), "--dataset_prepared_path", str(tmp_path / "p"))


@pytest.mark.slow
def test_default_job_redirected_to_a_file_reads_top_to_bottom(tmp_path: Path) -> None:
    """As in a SLURM log or `| tee`: no carriage-return bars, one formatted line per log step with the ETA."""
    result = _run(*_default_job_args(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert "\r" not in text and "{'" not in text
    assert _spam(result) == [] and "DEBUG" not in text
    assert not any(bar in text for bar in LIBRARY_BARS)
    assert "Run overview" in result.stdout and "Done: 3 steps" in result.stdout
    steps = [line for line in result.stdout.splitlines() if re.match(r"step [123]/3  loss [0-9.]+  lr ", line)]
    assert len(steps) == 3 and all(re.search(r"tok/s [0-9,]+  elapsed 0:00:\d\d  ETA \d:\d\d:\d\d$", s) for s in steps)
    assert re.search(r"^step 0/3  eval loss [0-9.]+", result.stdout, re.MULTILINE)
    assert re.search(r"^step 3/3  eval loss [0-9.]+", result.stdout, re.MULTILINE)


def _run_in_a_terminal(*args: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal (120 columns) as its standard output and error."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, WANDB_MODE="disabled", COLUMNS="120")
    for quieting in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        env.pop(quieting, None)
    proc = subprocess.Popen([sys.executable, "-m", "dolphin_train", *args], stdout=terminal, stderr=terminal,
                            stdin=subprocess.DEVNULL, env=env, cwd=REPO)  # fmt: skip
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_default_job_in_a_terminal_draws_one_training_bar_and_formatted_lines(tmp_path: Path) -> None:
    code, text = _run_in_a_terminal(*_default_job_args(tmp_path))
    assert code == 0, text[-3000:]
    assert "{'" not in text and not any(bar in text for bar in LIBRARY_BARS)
    bars = {m.group(1) or "" for m in re.finditer(r"(?:^|\r)(?:([^\r\n:]*): )?\s*\d+%\|", text, re.MULTILINE)}
    assert bars == {"training", "Reading tiny_chat.jsonl", "Tokenizing"}  # ours; no (unnamed) evaluation bar
    assert re.search(r"training: 100%\|.*3/3", text)
    lines = text.replace("\r", "\n").splitlines()
    steps = [line for line in lines if re.fullmatch(r"step [123]/3  loss [0-9.]+  lr .*tok/s [0-9,]+", line.strip())]
    assert len(steps) == 3


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


def test_the_peak_memory_is_the_run_own_not_that_of_the_process_that_launched_it() -> None:
    """Linux folds the launching process's peak into getrusage's ru_maxrss at exec: a run started from a large
    process (the test session itself) reported that process's peak (the CPU plan-vs-measured tests failed)."""
    held = bytearray(1024 * 2**20)  # this process holds 1 GiB while it launches the child
    held[:: 4096] = b"\1" * len(held[:: 4096])
    code = "from dolphin_train.train.outputs import peak_memory_mb; print(peak_memory_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 900, f"the child reports {child:.0f} MiB: its launcher's 1 GiB"
