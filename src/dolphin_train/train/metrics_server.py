"""Training metrics served over HTTP for Prometheus to scrape (`use_otel_metrics`, axolotl's key).

Every numeric value of each log step (loss, grad_norm, learning_rate, epoch, tokens/s, MFU, eval_loss...)
becomes a gauge named `dolphin_train_<key>`, next to the step and the process's own resident memory and
CPU time. axolotl builds the same endpoint through the OpenTelemetry SDK and its Prometheus reader; what a
scraper reads is the Prometheus text format either way, so we write it with prometheus_client alone (one
small package; the SDK would only translate names and units on the way).

Only the main process serves: the others would compete for the same port.
"""

from __future__ import annotations

import re
from numbers import Real
from typing import Any

from transformers import TrainerCallback

from dolphin_train.errors import EnvironmentProblem

PREFIX = "dolphin_train_"


def metric_name(log_key: str) -> str:
    """A Prometheus metric name for a log key: `eval/loss` → `dolphin_train_eval_loss`."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", log_key)


class PrometheusMetrics(TrainerCallback):
    """Serves the latest value of every logged number at http://host:port/metrics."""

    def __init__(self, host: str, port: int) -> None:
        try:
            import prometheus_client as prom
        except ImportError as e:
            raise EnvironmentProblem(
                "use_otel_metrics: true needs prometheus_client: pip install 'dolphin-train[metrics]'"
            ) from e
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=self.registry)  # resident memory and CPU seconds, as axolotl reports memory
        self._gauges: dict[str, Any] = {}
        self.step = prom.Gauge(PREFIX + "global_step", "Optimizer steps done", registry=self.registry)
        self.url = f"http://{host}:{port}/metrics"
        try:
            self.server, self._thread = prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise EnvironmentProblem(
                f"use_otel_metrics: cannot serve metrics on {host}:{port} ({e.strerror or e}); choose another "
                "otel_metrics_port or otel_metrics_host"
            ) from e

    def gauge(self, log_key: str) -> Any:
        if log_key not in self._gauges:
            name = metric_name(log_key)
            self._gauges[log_key] = self._prom.Gauge(name, f"Last logged {log_key}", registry=self.registry)
        return self._gauges[log_key]

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.step.set(state.global_step)
        for key, value in (logs or {}).items():
            if isinstance(value, Real) and not isinstance(value, bool):  # NaN too: a scraper should see it
                self.gauge(key).set(float(value))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
