"""Experiment tracking: an offline wandb run or TensorBoard event files hold the loss history, next to
the model; every wandb key reaches wandb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from dolphin_train.cli import main
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.schema import Config, documented_fields
from dolphin_train.train.arguments import report_to
from dolphin_train.train.environment import wandb_environment


@pytest.mark.slow
def test_offline_wandb_run_records_the_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite disables wandb; this test turns it on offline
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = tiny_config(tmp_path, max_steps=4, sample_packing=True, micro_batch_size=4, wandb_project="dolphin-test",
                      wandb_mode="offline", wandb_name="tiny")  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", cfg))]) == 0
    runs = list((tmp_path / "out/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run's record log (what `wandb sync` uploads) holds one history record per logged step; wandb
    # ships no reader for it, so count the loss key in the records.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert records.count(b"train/loss") >= 4
    assert b"train/tokens_per_second" in records  # our throughput reaches wandb too
    # The run's config holds ours, resolved, with the hashes the run summary has.
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert b"dolphin_train" in records and summary["config_hash"].encode() in records
    assert b"wandb_project" in records and b"dolphin-test" in records


def test_the_config_saved_with_the_model_loads_back_to_the_same_config(tmp_path: Path) -> None:
    from dolphin_train.config.load import load_config
    from dolphin_train.train.outputs import CONFIG_SNAPSHOT, config_hash

    raw = tiny_config(tmp_path, max_steps=1, micro_batch_size=2, bf16="auto")
    path = write_config(tmp_path / "c.yml", raw)
    assert main([str(path), "--learning_rate", "2e-3"]) == 0  # an override is part of what ran
    snapshot = tmp_path / "out" / CONFIG_SNAPSHOT
    header = snapshot.read_text().splitlines()[1]
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert summary["config_hash"] in header and summary["data_fingerprint"] in header
    ran = load_config(path, {"learning_rate": 2e-3})
    saved = load_config(snapshot, {})
    assert saved.learning_rate == 2e-3 and saved.bf16 is False  # `auto` resolved on this CPU machine
    assert config_hash(saved.model_copy(update={"bf16": ran.bf16, "fp16": ran.fp16})) == config_hash(ran)


def test_every_wandb_key_reaches_wandb_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_DIR", raising=False)
    values = {"wandb_project": "p", "wandb_entity": "team", "wandb_name": "run-1", "wandb_run_id": "abc123",
              "wandb_mode": "offline", "wandb_watch": "gradients", "wandb_log_model": "end"}  # fmt: skip
    cfg = validate_mapping(tiny_config(tmp_path, **values))
    env = wandb_environment(cfg)
    assert env == {
        "WANDB_PROJECT": "p",
        "WANDB_ENTITY": "team",
        "WANDB_NAME": "run-1",
        "WANDB_RUN_ID": "abc123",
        "WANDB_MODE": "offline",
        "WANDB_WATCH": "gradients",
        "WANDB_LOG_MODEL": "end",
        "WANDB_DIR": cfg.output_dir,  # runs next to the model
        "WANDB_RESUME": "allow",  # a run id resumes that run
    }
    # A wandb key added to the schema must be mapped too.
    schema_keys = {k for k in documented_fields(Config) if k.startswith("wandb_")}
    assert schema_keys == set(values)
    assert wandb_environment(validate_mapping(tiny_config(tmp_path))) == {}


def test_trackers_wandb_tensorboard_both_or_none(tmp_path: Path) -> None:
    def trackers(**keys: object) -> list[str] | str:
        return report_to(validate_mapping(tiny_config(tmp_path, **keys)))

    assert trackers() == "none"
    assert trackers(wandb_project="p") == ["wandb"]
    assert trackers(use_tensorboard=True) == ["tensorboard"]
    assert trackers(wandb_project="p", use_tensorboard=True) == ["wandb", "tensorboard"]


def test_tensorboard_missing_fails_at_start_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("dolphin_train.train.environment.tensorboard_installed", lambda: False)
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, use_tensorboard=True, max_steps=1))
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "pip install tensorboard" in err and "Traceback" not in err
    assert not (tmp_path / "prepared").exists()  # before any data preparation


@pytest.mark.slow
def test_tensorboard_events_hold_every_logged_loss_and_throughput(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="pip install tensorboard (a test dependency)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, max_steps=4, save_steps=4, sample_packing=True, micro_batch_size=4,
                      use_tensorboard=True)  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", cfg))]) == 0
    runs = list((tmp_path / "out/runs").iterdir())
    assert len(runs) == 1  # one directory per run under output_dir/runs/
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    history = json.loads((tmp_path / "out/checkpoint-4/trainer_state.json").read_text())["log_history"]
    logged = {e["step"]: e["loss"] for e in history if "loss" in e}
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3, 4] == sorted(logged)
    assert losses == pytest.approx(logged, rel=1e-6)  # float32 in the event file
    throughput = {e.step: e.value for e in events.Scalars("train/tokens_per_second")}
    assert sorted(throughput) == [1, 2, 3, 4] and min(throughput.values()) > 0
