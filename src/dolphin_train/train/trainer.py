"""The Trainer we run: transformers' Trainer with the chunked loss wired in, and the evaluation loss
averaged over tokens.

Why our own code: transformers averages the evaluation loss over batches (each batch's mean loss, weighted
by its rows), so it changes with `micro_batch_size`, with eval packing and with conversation lengths, and
it is not the quantity the training loss reports (a mean over trained tokens). Here every evaluated
batch adds its summed loss and its count of trained tokens, and the reported `eval_loss` is their ratio
over the whole evaluation set and all processes: the same number however the set is batched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.model.context_parallel import ContextGroup, sharded_sequence
from dolphin_train.train.context_parallel import cut_batch, share_rows_within_groups
from dolphin_train.train.control import CheckpointPart
from dolphin_train.train.generation_eval import GenerationEval
from dolphin_train.train.in_backward import OptimizerInBackward
from dolphin_train.train.loss import ChunkedLossHead, loss_from_head
from dolphin_train.train.throughput import ThroughputMeter


def trained_targets(labels: torch.Tensor, shifted: bool = False) -> int:
    """Positions a causal LM loss averages over: labels shift left by one (unless given shifted, as a
    context-parallel share has them), ignored labels do not count."""
    return int((labels if shifted else labels[..., 1:]).ne(IGNORE_INDEX).sum())


def multiplied_schedule(scheduler: Any, multiplier: Callable[[int], float]) -> Any:
    """transformers' schedules are LambdaLR: the same schedule with each factor multiplied by `multiplier`.
    Its state (the step) is saved and resumed as the plain schedule's is."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(scheduler, LambdaLR):
        raise TypeError(f"a learning-rate multiplier needs a LambdaLR schedule, not {type(scheduler).__name__}")
    factors = [lambda step, f=f: f(step) * multiplier(step) for f in scheduler.lr_lambdas]
    return LambdaLR(scheduler.optimizer, factors)


class LossTally:
    """Summed loss and trained-token count of the batches one process evaluated."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0

    def add(self, mean_loss: torch.Tensor, tokens: int) -> None:
        if tokens:
            self.loss_sum += float(mean_loss) * tokens
            self.tokens += tokens

    def mean_over_processes(self, accelerator: Any) -> float | None:
        totals = torch.tensor([self.loss_sum, float(self.tokens)], dtype=torch.float64, device=accelerator.device)
        loss_sum, tokens = accelerator.reduce(totals, reduction="sum").tolist()
        return loss_sum / tokens if tokens else None


class DolphinTrainer(Trainer):
    """transformers.Trainer with methods its documentation invites subclasses to override: `compute_loss`,
    `evaluation_loop` (which adds the generation table and metrics when asked for: generation_eval.py),
    `training_step` (which counts each micro-batch's FLOPs), `log` (which adds the throughput figures to
    each training log) and `save_model` (which writes the CheckpointParts into a checkpoint)."""

    _eval_tally: LossTally | None = None

    def __init__(
        self,
        *args: Any,
        chunked_head: ChunkedLossHead | None = None,
        throughput: ThroughputMeter | None = None,
        optimizer_in_backward: Callable[..., Any] | None = None,
        generation_eval: GenerationEval | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
        lr_schedule: Callable[[Any, int], Any] | None = None,
        context_group: ContextGroup | None = None,
        **kwargs: Any,
    ) -> None:
        self.context_group = context_group
        self.optimizer_in_backward = optimizer_in_backward
        self.generation_eval = generation_eval
        self.lr_multiplier = lr_multiplier
        self.lr_schedule = lr_schedule
        if chunked_head is not None:
            kwargs["compute_loss_func"] = loss_from_head
        super().__init__(*args, **kwargs)
        self.chunked_head = chunked_head
        self.throughput = throughput
        if throughput is not None:
            self.add_callback(throughput)

    def create_optimizer(self, model: Any = None) -> Any:
        """With `optimizer_in_backward`, the optimizer that steps each parameter during the backward pass
        (train/in_backward.py); the Trainer's own otherwise."""
        if self.optimizer_in_backward is None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(self.model))
            self.optimizer = OptimizerInBackward(self.model.named_parameters(), self.optimizer_in_backward,
                                                 self.args.learning_rate, self.args.weight_decay, decay,
                                                 eager=self.args.device.type == "cpu")  # fmt: skip
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The configured schedule: `lr_schedule(optimizer, steps)` where transformers has none
        (`cosine_constant_lr_ratio`), else the Trainer's own; times `lr_multiplier(step)` where one is given
        (the jagged restarts)."""
        created = self.lr_scheduler is None
        if created and self.lr_schedule is not None:
            scheduler = self.lr_scheduler = self.lr_schedule(optimizer or self.optimizer, num_training_steps)
        else:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and self.lr_multiplier is not None:
            self.lr_scheduler = multiplied_schedule(scheduler, self.lr_multiplier)
        return self.lr_scheduler

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's own save; into a checkpoint, also every CheckpointPart callback's state (ReLoRA's merged
        weights). The Trainer saves the model first in a checkpoint, before the optimizer, the scheduler, the
        random-number states and trainer_state.json, which makes the checkpoint count as complete, and before
        it deletes older checkpoints; `on_save` comes after all of these."""
        super().save_model(output_dir, _internal_call)
        step = self.state.global_step
        into_checkpoint = output_dir is not None and Path(output_dir).name == f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if not (into_checkpoint and self.args.should_save):
            return
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CheckpointPart):
                callback.save_into_checkpoint(output_dir, self.model, step)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if self.throughput is not None:
            self.throughput.count_batch(inputs)  # what this micro-batch really computes, for MFU
        if self.context_group is None:
            return super().training_step(model, inputs, num_items_in_batch)
        # Context parallelism: the backward pass recomputes checkpointed layers, whose attention must
        # exchange heads for tokens as in the forward pass: the whole step runs with the sequence sharded.
        with sharded_sequence(self.context_group):
            return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.throughput is not None and "loss" in logs:
            logs = {**logs, **self.throughput.figures(self.state)}
        if self.optimizer_in_backward is not None:
            logs.pop("grad_norm", None)  # gradients are freed one by one: there is no whole-model norm
        super().log(logs, start_time)

    def get_cp_size(self) -> int:
        """The processes that share each batch (`context_parallel_size`): the Trainer divides the gathered
        trained-token count and the data-parallel world by it."""
        return self.context_group.size if self.context_group is not None else super().get_cp_size()

    def get_train_dataloader(self) -> Any:
        return self._shared_within_groups(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        return self._shared_within_groups(super().get_eval_dataloader(eval_dataset))

    def _shared_within_groups(self, dataloader: Any) -> Any:
        """With context parallelism, every process of a group gets the same batches (train/context_parallel.py)."""
        if self.context_group is None:
            return dataloader
        return share_rows_within_groups(dataloader, self.context_group)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.context_group is None:
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Context parallelism: this process computes its share of the batch's tokens, attention over all of them.
        inputs = cut_batch(inputs, self.context_group, self.processing_class.pad_token_id)
        with sharded_sequence(self.context_group):
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
        if self._eval_tally is None:
            return self._loss_with_targets(model, inputs, return_outputs, num_items_in_batch)
        # Evaluating: this batch's own mean over its trained tokens (no cross-process scaling), weighted
        # by those tokens in the tally. Counted first: the Trainer pops the labels from `inputs`.
        tokens = trained_targets(inputs["labels"], shifted="shift_labels" in inputs)
        result = self._loss_with_targets(model, inputs, return_outputs, None)
        self._eval_tally.add((result[0] if return_outputs else result).detach(), tokens)
        return result

    def _loss_with_targets(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items: Any) -> Any:
        """With the chunked loss, the head is handed the labels before the forward pass (see loss.py)."""
        if self.chunked_head is None:
            return super().compute_loss(model, inputs, return_outputs, num_items)
        shifted = "shift_labels" in inputs  # a context-parallel share: the head is given each position's target
        if shifted:
            inputs = {name: value for name, value in inputs.items() if name != "shift_labels"}
        with self.chunked_head.targets(inputs["labels"], num_items, shifted=shifted):
            return super().compute_loss(model, inputs, return_outputs, num_items)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        self._eval_tally = LossTally()
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            mean = self._eval_tally.mean_over_processes(self.accelerator)
        finally:
            self._eval_tally = None
        key = f"{metric_key_prefix}_loss"
        if mean is not None and key in output.metrics:
            output.metrics[key] = mean
        if self.generation_eval is not None:  # the table and eval_<metric> values (generation_eval.py)
            output.metrics.update(self.generation_eval.evaluate(self, metric_key_prefix))
        return output
