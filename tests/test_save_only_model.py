"""`save_only_model`: checkpoints hold the weights only, and resuming from one fails, saying what is missing,
instead of silently restarting the optimizer and the schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.resolve import resolve_runtime
from dolphin_train.errors import ConfigError, DolphinError
from dolphin_train.train.arguments import build_training_arguments
from dolphin_train.train.control import resolve_resume
from dolphin_train.train.schedule import compute_schedule

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}


def test_save_only_model_reaches_the_training_arguments() -> None:
    for value in (True, False):
        cfg = validate_mapping({**BASE, "save_only_model": value})
        args = build_training_arguments(cfg, resolve_runtime(cfg), compute_schedule(cfg, 10, 1, has_eval=False))
        assert args.save_only_model is value


def test_save_only_model_refused_with_sharded_fsdp_checkpoints() -> None:
    """transformers refuses the pair when the Trainer starts; here at load, naming the keys."""
    fsdp = {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}}
    with pytest.raises(ConfigError, match="state_dict_type: FULL_STATE_DICT"):
        validate_mapping({**BASE, **fsdp, "save_only_model": True})
    validate_mapping({**BASE, **fsdp})
    validate_mapping({**BASE, "fsdp_version": 2, "fsdp_config": {"fsdp_state_dict_type": "FULL_STATE_DICT"},
                      "save_only_model": True})  # fmt: skip


def _checkpoint(root: Path, step: int, full: bool) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (path / "model.safetensors").write_bytes(b"x")
    if full:
        (path / "optimizer.pt").write_bytes(b"x")
        (path / "rng_state.pth").write_bytes(b"x")
    return path


@pytest.mark.parametrize("value", ["auto", True, "named"])
def test_resume_refuses_a_weights_only_checkpoint(tmp_path: Path, value: object) -> None:
    path = _checkpoint(tmp_path, 4, full=False)
    cfg = validate_mapping({**BASE, "output_dir": str(tmp_path),
                            "resume_from_checkpoint": str(path) if value == "named" else value})  # fmt: skip
    with pytest.raises(DolphinError, match=r"model weights only \(save_only_model: true\).*base_model"):
        resolve_resume(cfg)
    _checkpoint(tmp_path, 8, full=True)  # a full one, later: resumable
    if value != "named":
        assert resolve_resume(cfg) == str(tmp_path / "checkpoint-8")


@pytest.mark.slow
def test_a_save_only_model_run_writes_weights_only_and_cannot_be_resumed(tmp_path: Path, capsys) -> None:
    from dolphin_train.cli import main

    keys = {"max_steps": 2, "save_steps": 2, "micro_batch_size": 4, "save_only_model": True}
    config = write_config(tmp_path / "c.yml", tiny_config(tmp_path, **keys))
    assert main([str(config)]) == 0
    checkpoint = tmp_path / "out" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert "model.safetensors" in names and "trainer_state.json" in names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}, names
    capsys.readouterr()
    assert main([str(config), "--resume_from_checkpoint", "auto"]) == 1
    err = capsys.readouterr().err
    assert "holds the model weights only" in err and "Traceback" not in err
