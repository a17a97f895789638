"""Exact resume after a hard kill, clean stop on SIGTERM, incomplete checkpoints never resumed from."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config
from dolphin_train.train.control import latest_complete_checkpoint

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, name: str, **overrides) -> Path:
    keys = {"max_steps": 9, "save_steps": 3, "sample_packing": True, "micro_batch_size": 4,
            "dataset_prepared_path": str(tmp_path / "prepared"), **overrides}  # fmt: skip
    return write_config(tmp_path / f"{name}.yml", tiny_config(tmp_path / name, **keys))


def _start(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "dolphin_train", str(config), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)  # fmt: skip


TRAINING_LINE = re.compile(r"^step +(\d+)/(\d+)  loss ([0-9.]+)  lr ([0-9.e+-]+)")


def _logged_steps(stdout: str) -> dict[int, tuple[float, float]]:
    """{step: (loss, learning rate)} from the run's training lines."""
    found = {}
    for line in stdout.splitlines():
        if m := TRAINING_LINE.match(line):
            found[int(m.group(1))] = (float(m.group(3)), float(m.group(4)))
    return found


def _run_until_step(proc: subprocess.Popen, step: int, timeout: float = 300) -> list[str]:
    """Read the run's output until it logs `step` (torchrun's --tee prefixes each line with its rank); the
    lines read so far."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if (m := TRAINING_LINE.match(re.sub(r"^\[default\d\]:", "", line))) and int(m.group(1)) >= step:
            return lines
        assert time.monotonic() < deadline, "the run did not reach the step in time"
    raise AssertionError(f"the run ended before step {step}: {''.join(lines)[-3000:]}")


def _wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (out / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    saved = out / "adapter_model.safetensors"
    return load_file(str(saved if saved.exists() else out / "model.safetensors"))


def _saved_base(tmp_path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model")).save_pretrained(path)
    return path


@pytest.mark.parametrize("variant", ["full fine-tuning", "LoRA, chunked loss", "bf16 weights, optimizer in backward"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path, variant: str) -> None:
    """Killed between two checkpoints, then resumed: the resumed process runs only the remaining steps, with
    the learning rate and loss of the uninterrupted run at each of them (scheduler, optimizer state, data
    position and weights restored), and ends with its weights. Resuming with a fresh optimizer, a fresh
    scheduler, from the first batch or from step 0 fails this test."""
    keys = {}
    if variant.startswith("LoRA"):  # the head trained in full (added tokens) sits in the chunked-loss head
        keys = {"adapter": "lora", "lora_r": 4, "chunked_cross_entropy": True, "train_from_scratch": False,
                "base_model": str(_saved_base(tmp_path))}  # fmt: skip
    if variant.startswith("bf16"):  # per-parameter 8-bit states and stochastic rounding: restored exactly too
        keys = {"bf16": True, "bfloat16": True, "optimizer_in_backward": True, "optimizer": "adamw_torch_8bit",
                "max_grad_norm": 0.0}  # fmt: skip
    # The uninterrupted run and the one to be killed run side by side (one thread each; the data cache takes
    # concurrent writers): the test's time is that of the longer, not of both.
    straight = _start(_config(tmp_path, "straight", **keys))
    config = _config(tmp_path, "killed", **keys)
    out = tmp_path / "killed/out"
    proc = _start(config)
    killed_log = _run_until_step(proc, 4)  # past the checkpoint at step 3; the next one comes at step 6
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stdout, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-3000:]
    uninterrupted = _logged_steps(stdout)
    assert sorted(uninterrupted) == list(range(1, 10))
    last = latest_complete_checkpoint(out)
    assert last is not None and last.name == "checkpoint-3", "the kill did not land between two checkpoints"
    assert max(_logged_steps("".join(killed_log))) > 3  # it trained past the checkpoint it resumes from

    resumed = _start(config, "--resume_from_checkpoint", "auto")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"Resuming from {last}: 3 of 9 steps done" in stdout
    assert "from scratch" not in stdout and f"resumed from {last}" in stdout.replace("\n", "")
    after = _logged_steps(stdout)
    assert sorted(after) == [4, 5, 6, 7, 8, 9]  # only the remaining steps
    for step, (loss, lr) in after.items():
        assert lr == pytest.approx(uninterrupted[step][1], rel=1e-6), f"learning rate at step {step}"
        assert loss == pytest.approx(uninterrupted[step][0], abs=2e-4), f"loss at step {step}"

    expected, actual = _weights(tmp_path / "straight/out"), _weights(out)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    config = _config(tmp_path, "term", max_steps=400, save_steps=2)
    out = tmp_path / "term/out"
    proc = _start(config, "--save_total_limit", "50")
    _wait_for_checkpoint(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Stopped" in stdout
    # the whole command to resume, with the overrides it was started with
    assert f"dolphin-train train {config} --save_total_limit 50 --resume_from_checkpoint auto" in stdout
    last = latest_complete_checkpoint(out)
    assert last is not None and 2 <= int(last.name.split("-")[1]) < 400
    assert str(last) in stdout.replace("\n", "")  # the message names the checkpoint it saved


def _worker_pids(launcher: subprocess.Popen, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started: its children, each with RANK in its environment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for proc_dir in Path("/proc").iterdir():
            try:
                parent = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (proc_dir / "environ").read_bytes().split(b"\0") if parent == launcher.pid else []
            except (OSError, ValueError, IndexError):
                continue
            env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
            if b"RANK" in env:
                found[int(env[b"RANK"])] = int(proc_dir.name)
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun's workers not found")


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """A signal reaching one rank only (as a scheduler may deliver it): every rank stops after the same
    step, the checkpoint is saved, and the job ends cleanly."""
    config = _config(tmp_path, "two", max_steps=400, save_steps=1000, micro_batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--tee", "3", "-m",
           "dolphin_train", str(config)]  # fmt: skip
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)  # fmt: skip
    _run_until_step(launcher, 3)  # both ranks are training
    os.kill(_worker_pids(launcher)[1], signal.SIGTERM)  # rank 1 only
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, output[-3000:]
    stops = {int(r): int(s) for r, s in re.findall(r"\[default(\d)\]:.*Stopping at step (\d+)", output)}
    assert set(stops) == {0, 1} and stops[0] == stops[1] < 400
    last = latest_complete_checkpoint(tmp_path / "two/out")
    assert last is not None and last.name == f"checkpoint-{stops[0]}"


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    """The first Ctrl-C asks for a checkpoint after the current step; a second one stops without it."""
    config = _config(tmp_path, "twice", max_steps=400, save_steps=1000, micro_batch_size=16, sequence_len=512)
    proc = _start(config)
    _run_until_step(proc, 2)
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # wait for the first signal to be taken, then send the second one mid-step
        if "Received SIGINT" in line:
            proc.send_signal(signal.SIGINT)
            break
    _stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert latest_complete_checkpoint(tmp_path / "twice/out") is None  # no checkpoint was saved after all


def test_incomplete_checkpoint_is_never_the_latest(tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
        (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}' if complete else '{"glob')
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_incomplete_checkpoints_never_count_towards_save_total_limit(tmp_path: Path) -> None:
    """Removed before training: left in place, transformers' rotation (save_total_limit) counts them and deletes
    the oldest complete checkpoint first."""
    from dolphin_train.train.control import remove_incomplete_checkpoints

    for step, complete in ((2, True), (4, True), (6, False), (8, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}' if complete else '{"glob')
    (tmp_path / "checkpoint-8" / "trainer_state.json").unlink()  # cut off before the state was written
    removed = remove_incomplete_checkpoints(tmp_path)
    assert [p.name for p in removed] == ["checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_diverged_loss_stops_the_run_naming_the_step(tmp_path: Path, capsys) -> None:
    from dolphin_train.cli import main

    config = _config(tmp_path, "nan", max_steps=30, save_steps=1000, optimizer="sgd", learning_rate=1e12,
                     max_grad_norm=0.0)  # fmt: skip
    assert main([str(config)]) == 1
    err = capsys.readouterr().err
    assert "became NaN or infinite at step" in err and "Traceback" not in err
