"""The training progress bar: transformers' bar (step/total, elapsed and ETA) with the latest loss and
throughput as its postfix, so a glance at the terminal says whether the run is healthy."""

from __future__ import annotations

from typing import Any

from transformers.trainer_callback import ProgressCallback

# Log keys shown on the bar, in order, with their labels. `tokens_per_second` is added to the logs by
# ThroughputCallback, which runs before this callback.
POSTFIX_KEYS = (("loss", "loss"), ("tokens_per_second", "tok/s"), ("eval_loss", "eval loss"))


def postfix_text(latest: dict[str, float]) -> str:
    parts = []
    for key, label in POSTFIX_KEYS:
        if key in latest:
            value = latest[key]
            parts.append(f"{label} {value:,.0f}" if key == "tokens_per_second" else f"{label} {value:.4g}")
    return ", ".join(parts)


class TrainingProgress(ProgressCallback):
    """Replaces transformers' ProgressCallback. Log lines are still written above the bar (tqdm.write, as
    the parent does), so they never break it; only the main process draws a bar."""

    def __init__(self) -> None:
        super().__init__()
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        self.latest = {}
        if self.training_bar is not None:
            self.training_bar.set_description("training")
            self.training_bar.unit = "step"  # tqdm's rate then reads step/s or s/step, not it/s

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().on_log(args, state, control, logs=logs, **kwargs)
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        # An evaluation log carries no training loss: keep the last one rather than blanking it.
        self.latest.update({k: float(logs[k]) for k, _ in POSTFIX_KEYS if isinstance(logs.get(k), (int, float))})
        self.training_bar.set_postfix_str(postfix_text(self.latest))
