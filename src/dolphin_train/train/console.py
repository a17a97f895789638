"""What a run prints while it trains: one progress bar on a terminal, and one formatted line per logging
step and per evaluation, so the console reads top to bottom in a terminal and in a log file alike.

It replaces transformers' ProgressCallback (whose log lines are raw Python dicts, and which draws a second
bar for every evaluation). When standard error is not a terminal (a SLURM log, `| tee`), no bar is drawn:
each log line then carries the elapsed time and the ETA instead.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from transformers import TrainerCallback

# Log keys a training line shows, in order: (key, label, format).
TRAINING_FIGURES = (
    ("loss", "loss", "{:.4f}"),
    ("learning_rate", "lr", "{:.3e}"),
    ("grad_norm", "grad norm", "{:.3g}"),
    ("tokens_per_second", "tok/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
)


# Evaluation log keys after the loss: the metrics of `do_causal_lm_eval`.
EVALUATION_FIGURES = (
    ("eval_loss", "eval loss", "{:.4f}"),
    ("eval_perplexity", "perplexity", "{:.4g}"),
    ("eval_sacrebleu", "BLEU", "{:.2f}"),
    ("eval_chrf", "chrF", "{:.2f}"),
    ("eval_ter", "TER", "{:.2f}"),
)


def duration(seconds: float) -> str:
    """0:02:05 (hours:minutes:seconds), or ? when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _figure(logs: dict[str, Any], key: str, label: str, form: str) -> str | None:
    value = logs.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return f"{label} {form.format(value)}"


def training_line(step: int, total: int, logs: dict[str, Any]) -> str:
    figures = [f for key, label, form in TRAINING_FIGURES if (f := _figure(logs, key, label, form))]
    return "  ".join([f"step {step:>{len(str(total))}}/{total}", *figures])


def evaluation_line(step: int, total: int, logs: dict[str, Any]) -> str:
    figures = [f for key, label, form in EVALUATION_FIGURES if (f := _figure(logs, key, label, form))]
    runtime = logs.get("eval_runtime")
    seconds = f"({runtime:.1f} s)" if isinstance(runtime, (int, float)) else ""
    return "  ".join([f"step {step:>{len(str(total))}}/{total}", *figures, seconds]).rstrip()


def bar_postfix(logs: dict[str, Any]) -> str:
    """The latest loss and throughput, at the end of the bar."""
    return ", ".join(f for key, label, form in TRAINING_FIGURES if key in ("loss", "tokens_per_second")
                     and (f := _figure(logs, key, label, form)))  # fmt: skip


class TrainingConsole(TrainerCallback):
    """The training bar and log lines (main process only)."""

    def __init__(self, bar: bool, out: TextIO | None = None) -> None:
        self.draw_bar = bar
        self.out = out
        self.bar: Any = None
        self.started = 0.0
        self.first_step = 0

    def _write(self, line: str) -> None:
        out = self.out or sys.stdout  # looked up now: the stream may have been replaced since import
        if self.bar is not None:
            self.bar.write(line, file=out)
        else:
            print(line, file=out, flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.started, self.first_step = time.monotonic(), state.global_step  # a resumed run starts mid-way
        if self.draw_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True, file=sys.stderr)  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def _timing(self, state: Any) -> str:
        """Elapsed and remaining time, for lines that stand without a bar."""
        elapsed = time.monotonic() - self.started
        done = state.global_step - self.first_step
        remaining = elapsed / done * (state.max_steps - state.global_step) if done > 0 else float("nan")
        return f"elapsed {duration(elapsed)}  ETA {duration(remaining)}"

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            line = training_line(state.global_step, state.max_steps, logs)
            if self.bar is not None:
                self.bar.set_postfix_str(bar_postfix(logs), refresh=False)
            else:
                line += "  " + self._timing(state)
        elif "eval_loss" in logs:
            line = evaluation_line(state.global_step, state.max_steps, logs)
        else:  # the Trainer's closing summary (train_runtime...): the CLI prints its own
            return
        self._write(line)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
