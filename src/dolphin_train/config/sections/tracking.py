"""The reference's `logging` keys: logging, evaluation (generation and causal-LM metrics included), checkpoints
saved, and tracking (Weights & Biases, TensorBoard, Prometheus metrics)."""

from __future__ import annotations

from typing import Literal

from dolphin_train.config.keys import Section, key

# `eval_causal_lm_metrics` names (axolotl's list); `comet` is known so that it is refused with the reason.
CausalLMMetric = Literal["sacrebleu", "chrf", "ter", "perplexity", "comet"]
DEFAULT_CAUSAL_LM_METRICS = ("sacrebleu", "ter", "chrf")


class LoggingKeys(Section):
    """Logging, evaluation, checkpoints saved, experiment tracking."""

    logging_steps: int = key(1, "Log loss and learning rate every N optimizer steps.", "logging", ge=1)
    evals_per_epoch: int | None = key(
        None, "Evaluations per epoch (needs `val_set_size`); 0, as unset: one at each epoch's end.", "logging", ge=0
    )
    eval_steps: int | None = key(None, "Evaluate every N steps (instead of `evals_per_epoch`).", "logging", ge=1)
    saves_per_epoch: int | None = key(None, "Checkpoints per epoch.", "logging", ge=1)
    save_steps: int | None = key(None, "Checkpoint every N steps (instead of `saves_per_epoch`).", "logging", ge=1)
    save_total_limit: int | None = key(None, "Keep at most this many checkpoints.", "logging", ge=1)
    save_only_model: bool = key(
        False,
        "Checkpoints hold the model weights only (no optimizer, scheduler or random-number state): smaller "
        "and faster to write, but a run cannot resume from them (`resume_from_checkpoint` refuses such a "
        "checkpoint rather than restart the optimizer from zero); use one as `base_model` instead.",
        "logging",
    )
    eval_batch_size: int | None = key(
        None, "Rows per device per evaluation forward pass (default: `micro_batch_size`).", "logging", ge=1
    )
    eval_table_size: int | None = key(
        None,
        "At each evaluation, greedy predictions for this many evaluation turns: the prompt (the conversation up "
        "to the turn's first trained token), the model's completion and the reference, written to "
        "`output_dir/eval_predictions/step-N.jsonl` (and a wandb Table when wandb is on). 0 or empty: none.",
        "logging",
        ge=0,
    )
    eval_max_new_tokens: int | None = key(
        None,
        "Tokens generated per prediction of `eval_table_size` and `do_causal_lm_eval` (default 128, as axolotl); "
        "accepted without them, as in axolotl's configs, where it then has no use.",
        "logging",
        ge=1,
    )
    eval_table_max_new_tokens: int | None = key(
        None, "As `eval_max_new_tokens` (axolotl's older name).", "logging", ge=1
    )
    do_causal_lm_eval: bool = key(
        False,
        "At each evaluation, greedy predictions for every evaluation turn, scored against the references by "
        "`eval_causal_lm_metrics`; logged as `eval_<metric>` next to the evaluation loss.",
        "logging",
    )
    eval_causal_lm_metrics: list[CausalLMMetric] | None = key(
        None,
        "Metrics of `do_causal_lm_eval`: `sacrebleu`, `chrf`, `ter` (corpus scores, need `pip install "
        "sacrebleu`) and `perplexity` (the model's perplexity on the reference texts); default: sacrebleu, ter "
        "and chrf (axolotl's list without `comet`, which needs a model from the hub).",
        "logging",
        min_length=1,
    )
    wandb_project: str | None = key(None, "Weights & Biases project; logging to wandb is on when set.", "logging")
    use_wandb: bool | None = key(
        None,
        "axolotl's wandb switch: `true` logs to wandb even without `wandb_project` (wandb then takes its project "
        "from WANDB_PROJECT); `false` is the default when no project is set, and contradicts a `wandb_project`.",
        "logging",
    )
    wandb_entity: str | None = key(None, "Weights & Biases entity (team or user).", "logging")
    wandb_name: str | None = key(None, "Run name shown in wandb.", "logging")
    wandb_run_id: str | None = key(None, "Run id, to resume a wandb run.", "logging")
    wandb_mode: Literal["online", "offline", "disabled"] | None = key(None, "wandb mode.", "logging")
    wandb_watch: Literal["gradients", "parameters", "all", "false"] | None = key(
        None, "Log gradients and/or parameters to wandb.", "logging"
    )
    wandb_log_model: Literal["checkpoint", "end", "false"] | None = key(
        None, "Upload checkpoints or the final model to wandb.", "logging"
    )
    use_tensorboard: bool = key(
        False,
        "Write TensorBoard event files to `output_dir/runs/` (needs `pip install tensorboard`); can be combined "
        "with wandb.",
        "logging",
    )
    use_otel_metrics: bool = key(
        False,
        "Serve every logged number (loss, grad_norm, learning_rate, tokens/s, eval_loss...) as Prometheus "
        "gauges named `dolphin_train_<key>`, with the step and the process's memory, at "
        "http://otel_metrics_host:otel_metrics_port/metrics while the run lasts (main process; needs "
        "`pip install 'dolphin-train[metrics]'`).",
        "logging",
    )
    otel_metrics_host: str | None = key(
        None, "Address the metrics endpoint listens on (default localhost; 0.0.0.0 for every interface).", "logging"
    )
    otel_metrics_port: int | None = key(None, "Port of the metrics endpoint (default 8000).", "logging", ge=1, le=65535)
    debug: bool = key(
        False,
        "Before training, print the first training row token by token with its ids, trained tokens highlighted "
        "(axolotl's label check; `dolphin-train inspect --ids` shows more rows).",
        "logging",
    )

    @property
    def uses_wandb(self) -> bool:
        return bool(self.wandb_project) or self.use_wandb is True

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the Prometheus endpoint, or None when `use_otel_metrics` is off."""
        if not self.use_otel_metrics:
            return None
        return self.otel_metrics_host or "localhost", self.otel_metrics_port or 8000

    @property
    def generates_at_evaluation(self) -> bool:
        """A prediction table or causal-LM metrics: evaluation also generates text."""
        return bool(self.eval_table_size) or self.do_causal_lm_eval

    @property
    def eval_new_tokens(self) -> int:
        return self.eval_max_new_tokens or self.eval_table_max_new_tokens or 128

    @property
    def causal_lm_metrics(self) -> tuple[str, ...]:
        """The metrics `do_causal_lm_eval` computes (none when it is off)."""
        if not self.do_causal_lm_eval:
            return ()
        return tuple(dict.fromkeys(self.eval_causal_lm_metrics or DEFAULT_CAUSAL_LM_METRICS))
