"""One run per output_dir: a second run started into it is refused, naming the first's host and process id; a
lock left by a killed run is taken over; the ranks of one run never refuse each other."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config

LOCK = ".dolphin-train.lock"

# A process that takes the lock of argv[1], says "held" (or "refused: ..."), and releases it when its standard
# input closes.
HOLDER = """
import sys
from dolphin_train.train.run_lock import OutputDirInUse, take_output_dir
try:
    lock = take_output_dir(sys.argv[1])
except OutputDirInUse as exc:
    print("refused:", exc, flush=True)
    sys.exit(1)
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_env())  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _let_go(proc: subprocess.Popen) -> None:
    proc.communicate(timeout=60)
    assert proc.returncode == 0


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Two real runs: the second is refused (exit 1) while the first trains, then the first stops cleanly on
    SIGTERM and leaves no lock behind."""
    config = write_config(tmp_path / "c.yml", tiny_config(tmp_path, max_steps=100_000, save_steps=100_000))
    first = subprocess.Popen([sys.executable, "-m", "dolphin_train", str(config)], cwd=REPO, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert first.stdout is not None
        for line in first.stdout:  # wait until it trains
            if line.startswith("step "):
                break
        else:
            pytest.fail(f"the first run ended (exit {first.wait()}) before it trained")
        second = subprocess.run([sys.executable, "-m", "dolphin_train", str(config), "--max_steps", "2"], cwd=REPO,
                                env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        said = " ".join(second.stderr.split())
        assert f"output_dir {tmp_path / 'out'} is in use by another training run" in said
        assert f"host {socket.gethostname()}, process {first.pid}," in said
        assert "Traceback" not in second.stderr and not (tmp_path / "out/run_summary.json").exists()
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
        assert first.returncode == 0
        assert not (tmp_path / "out" / LOCK).exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_held_lock_refuses_another_run_until_released(tmp_path: Path) -> None:
    from dolphin_train.train.run_lock import OutputDirInUse, take_output_dir

    out = tmp_path / "out"
    holder = _holder(out)
    with pytest.raises(OutputDirInUse) as refused:
        take_output_dir(out)
    assert f"output_dir {out} is in use" in str(refused.value)
    assert f"host {socket.gethostname()}, process {holder.pid}," in str(refused.value)
    _let_go(holder)
    assert not (out / LOCK).exists()
    lock = take_output_dir(out)
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert list(out.iterdir()) == []  # nothing left behind


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    from dolphin_train.train.run_lock import take_output_dir

    out = tmp_path / "out"
    holder = _holder(out)
    holder.kill()  # SIGKILL: no chance to release
    holder.wait()
    assert (out / LOCK).exists()
    with caplog.at_level(logging.WARNING, logger="dolphin_train"):
        lock = take_output_dir(out)
    assert f"its run is no longer running (host {socket.gethostname()}, process {holder.pid}," in caplog.text
    lock.release()


def test_another_hosts_lock_holds_until_it_is_no_longer_refreshed(tmp_path: Path, caplog) -> None:
    """Another host's processes cannot be checked: its lock holds while its run refreshes it (every minute), and
    is taken over ten minutes after the last refresh."""
    from dolphin_train.train.run_lock import STALE_AFTER_S, OutputDirInUse, take_output_dir

    out = tmp_path / "out"
    out.mkdir()
    other = {"host": "gpu-node-17", "pid": 4242, "started": "2026-01-01 00:00:00 UTC", "token": "abc"}
    (out / LOCK).write_text(json.dumps(other))
    with pytest.raises(OutputDirInUse) as refused:
        take_output_dir(out)
    assert "host gpu-node-17, process 4242" in str(refused.value) and f"delete {out / LOCK}" in str(refused.value)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(out / LOCK, (old, old))
    with caplog.at_level(logging.WARNING, logger="dolphin_train"):
        take_output_dir(out).release()
    assert "has not refreshed it for 11 minutes (host gpu-node-17" in caplog.text


def test_runs_started_at_once_one_takes_the_lock(tmp_path: Path) -> None:
    """Four runs at once, into a directory with a killed run's lock: exactly one holds it, the others are
    refused naming it."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x", "token": "t"}))
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=_env()) for _ in range(4)]  # fmt: skip
    said = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
    held = [p for p, s in zip(procs, said, strict=True) if s == "held"]
    assert len(held) == 1, said
    assert all(s.startswith("refused:") and f"process {held[0].pid}," in s for s in said if s != "held")
    for p in procs:
        p.communicate(timeout=60)
    assert not (out / LOCK).exists()


def test_the_other_ranks_of_a_run_neither_take_nor_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of a torchrun / accelerate / DeepSpeed / Ray run holds the lock; the other ranks go on."""
    from dolphin_train.train.run_lock import holding_output_dir

    out = tmp_path / "out"
    holder = _holder(out)
    before = (out / LOCK).read_text()
    monkeypatch.setenv("RANK", "1")
    with holding_output_dir(out):
        assert (out / LOCK).read_text() == before
    assert (out / LOCK).read_text() == before
    _let_go(holder)


def test_the_lock_is_released_when_the_run_fails(tmp_path: Path) -> None:
    from dolphin_train.train.run_lock import holding_output_dir

    with pytest.raises(RuntimeError), holding_output_dir(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK).exists()
        raise RuntimeError("the run failed")
    assert not (tmp_path / "out" / LOCK).exists()


def test_merge_lora_refuses_the_output_dir_of_a_run_still_training(tmp_path: Path, capsys) -> None:
    from dolphin_train.cli import main

    out = tmp_path / "out"
    holder = _holder(out)
    try:
        assert main(["merge-lora", "--base", str(REPO / "configs/tiny/model"), "--adapter", str(out)]) == 1
    finally:
        _let_go(holder)
    err = " ".join(capsys.readouterr().err.split())
    assert f"{out} is the output_dir of a run still training (host {socket.gethostname()}, process {holder.pid}," in err
    assert f"--adapter {out}/checkpoint-N" in err
