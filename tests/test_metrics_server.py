"""`use_otel_metrics`: the logged numbers served for Prometheus, read back over HTTP as a scraper would."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError, EnvironmentProblem
from dolphin_train.train.arguments import report_to
from dolphin_train.train.metrics_server import PrometheusMetrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """The samples of a Prometheus text page, by name (labels dropped: ours have none)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name.split("{")[0]] = float(value)
    return samples


def test_every_logged_number_is_served_with_the_step() -> None:
    metrics = PrometheusMetrics("127.0.0.1", free_port())
    try:
        logs = {"loss": 1.25, "grad_norm": 0.5, "learning_rate": 2e-4, "eval/loss": 1.5, "mfu": float("nan"),
                "note": "text", "done": True}  # fmt: skip
        metrics.on_log(None, SimpleNamespace(global_step=7), None, logs=logs)
        served = scrape(metrics.url)
        assert served["dolphin_train_loss"] == 1.25
        assert served["dolphin_train_grad_norm"] == 0.5
        assert served["dolphin_train_learning_rate"] == 2e-4
        assert served["dolphin_train_eval_loss"] == 1.5
        assert served["dolphin_train_global_step"] == 7
        assert served["dolphin_train_mfu"] != served["dolphin_train_mfu"]  # NaN is served, not hidden
        assert "dolphin_train_note" not in served and "dolphin_train_done" not in served
        assert served["process_resident_memory_bytes"] > 0
        metrics.on_log(None, SimpleNamespace(global_step=8), None, logs={"loss": 1.0})
        assert scrape(metrics.url)["dolphin_train_loss"] == 1.0  # the latest value
    finally:
        metrics.close()


def test_a_taken_port_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EnvironmentProblem, match=f"127.0.0.1:{port}.*otel_metrics_port"):
            PrometheusMetrics("127.0.0.1", port)


def test_a_training_run_serves_its_log(tmp_path: Path) -> None:
    from dolphin_train.recipe import set_up_run

    port = free_port()
    raw = tiny_config(tmp_path, max_steps=3, use_otel_metrics=True, otel_metrics_host="127.0.0.1",
                      otel_metrics_port=port)  # fmt: skip
    run = set_up_run(validate_mapping(raw))
    try:
        assert run.metrics.url == f"http://127.0.0.1:{port}/metrics"
        run.trainer.train()
        served = scrape(run.metrics.url)
        assert served["dolphin_train_global_step"] == 3
        assert served["dolphin_train_loss"] == pytest.approx(run.trainer.state.log_history[-2]["loss"])
        assert "dolphin_train_learning_rate" in served
    finally:
        run.metrics.close()


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ({"otel_metrics_port": 9000}, "otel_metrics_port: no effect without use_otel_metrics"),
        ({"use_otel_metrics": True, "otel_metrics_port": 70000}, "otel_metrics_port"),
        ({"use_wandb": False, "wandb_project": "p"}, "use_wandb: false, but wandb_project is set"),
    ],
)
def test_metrics_and_wandb_keys_are_checked(tmp_path: Path, keys: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        validate_mapping(tiny_config(tmp_path, **keys))


def test_use_wandb_turns_wandb_on_without_a_project(tmp_path: Path) -> None:
    assert report_to(validate_mapping(tiny_config(tmp_path, use_wandb=True))) == ["wandb"]
    assert report_to(validate_mapping(tiny_config(tmp_path, use_wandb=False))) == "none"
