"""Chunked cross-entropy for large vocabularies.

Why our own code: with a 128k vocabulary, the logits of one 4096-token row are 4096 x 128256 floats
(2 GiB in float32), and their gradient as much again: often the largest tensors of a step. Here the
model's output head, given the labels, returns the loss instead of logits: it computes logits only for
positions that have a label, a chunk at a time, each chunk recomputed in the backward pass rather than
stored. The result is the same loss (mean over trainable tokens of the global batch, through
`num_items_in_batch`) and the same gradients, without ever materialising the full logits.

The loss is computed inside the head's own forward so that whatever manages the head's weight sees an
ordinary module call: DeepSpeed ZeRO-3 and FSDP gather the sharded weight for it (and again for its
backward), peft's wrapper of a head trained in full calls it, DDP sees one forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from dolphin_train.config.schema import Config
from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.model.token_rows import lean_token_rows_class, project_with_rows

# Logits of one chunk: 2^24 values, 64 MiB in float32 and some 230 MiB with their backward working memory
# (128 positions of a 128k vocabulary). Smaller chunks hardly slow the GPU (each is still a large matrix
# product) and are what lets 8B QLoRA stay under 8 GiB.
LOGITS_PER_CHUNK = 2**24
CHUNKED_LOSS_MIN_VOCAB = 65536  # the default turns the chunked loss on from this vocabulary size


def use_chunked_cross_entropy(cfg: Config, vocab_size: int) -> bool:
    """The config's choice (`chunked_cross_entropy`, or axolotl's CutCrossEntropy asking for it), else on for
    large vocabularies (training and `plan` both decide here)."""
    if cfg.chunked_loss_choice is not None:
        return cfg.chunked_loss_choice
    return vocab_size >= CHUNKED_LOSS_MIN_VOCAB and not cfg.adapts_output_head


def chunk_tokens_for(vocab_size: int) -> int:
    """Positions per chunk so that one chunk's logits stay near LOGITS_PER_CHUNK elements."""
    return max(128, min(8192, LOGITS_PER_CHUNK // vocab_size))


class _LossTargets:
    """The labels a head computes the loss for, handed over for one forward pass (`with head.targets(...)`)."""

    _labels: torch.Tensor | None = None
    _num_items: Any = None
    _shifted = False
    chunk_tokens: int | None = None

    @contextmanager
    def targets(self, labels: torch.Tensor, num_items_in_batch: Any = None, shifted: bool = False) -> Iterator[None]:
        """`shifted`: each position's own target is given (context parallelism cuts rows after shifting)."""
        self._labels, self._num_items, self._shifted = labels, num_items_in_batch, shifted
        try:
            yield
        finally:
            self._labels = self._num_items = None
            self._shifted = False


class ChunkedLossHead(_LossTargets, torch.nn.Module):
    """Stands in for the output projection during training. It holds the projection's weight and bias
    (same parameters, so state-dict keys and tying are unchanged). Within `targets(...)` its forward
    returns the chunked loss of the hidden states it is given; otherwise it returns logits as usual."""

    def __init__(self, head: torch.nn.Linear, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.original = [head]  # a list, so the Linear is not registered twice as a submodule
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        return chunked_causal_lm_loss(hidden, self.weight, self.bias, self._labels, self._num_items,
                                      self.chunk_tokens, shifted=self._shifted)  # fmt: skip


@cache
def _token_rows_head_class() -> type:
    """peft's trainable token rows over the output head, computing the chunked loss (a subclass, so that peft
    still finds, saves and merges the rows where it put them)."""
    class ChunkedTokenRowsHead(_LossTargets, lean_token_rows_class()):
        """The head's frozen weight with the trained rows of the added tokens in place of its own: each
        chunk's logits take the trained rows' columns (model/token_rows.py says why not peft's forward)."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self._labels is None or len(self.active_adapters) != 1:
                return super().forward(x, *args, **kwargs)
            return chunked_causal_lm_loss(x, self.base_layer.weight, None, self._labels, self._num_items,
                                          self.chunk_tokens, rows=self.active_rows(),
                                          shifted=self._shifted)  # fmt: skip

    return ChunkedTokenRowsHead


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                row_index: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    if rows is not None:  # trained rows of added tokens replace those rows of the frozen weight
        logits = project_with_rows(hidden, weight, bias, row_index, rows)
    else:
        logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int | None = None,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    shifted: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy from hidden states (batch, seq, d): position i predicts label i+1 (label i when
    `shifted`: the labels are already each position's target). `rows`: (indices, trained rows) that replace
    those rows of `weight` (the added tokens of a frozen head)."""
    targets = (labels if shifted else labels[..., 1:]).reshape(-1)
    states = (hidden if shifted else hidden[..., :-1, :]).reshape(-1, hidden.shape[-1])
    keep = torch.nonzero(targets != IGNORE_INDEX, as_tuple=False).flatten()
    states, targets = states.index_select(0, keep), targets.index_select(0, keep)
    chunk_tokens = chunk_tokens or chunk_tokens_for(weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    # At least one (empty) chunk: a batch, or a context-parallel share, with no trained token still runs the
    # head and backward through the model, so every process takes part in the collectives of the backward pass.
    for start in range(0, max(1, targets.numel()), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, states[part], weight, bias, targets[part], *(rows or ()),
                                   use_reentrant=False)  # fmt: skip
    denominator = num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel())
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


def loss_from_head(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """`compute_loss_func` for transformers.Trainer: the head already returned the loss as the logits."""
    if outputs.logits.dim() != 0:  # a forward pass without `targets(...)`: never pass logits off as a loss
        raise RuntimeError("the chunked-loss head returned logits: the labels were not handed to it")
    return outputs.logits


def _peft_wrapper(module: Any, kind: str) -> Any | None:
    """peft's wrapper of a layer trained next to an adapter: `ModulesToSaveWrapper` (a trained copy) or
    `TrainableTokensWrapper` (trained rows of added tokens)."""
    try:
        from peft.utils import other
    except ImportError:
        return None
    return module if isinstance(module, getattr(other, kind)) else None


def install_chunked_head(model: Any) -> Any | None:
    """Swap the output head for one that computes the chunked loss; None (and nothing changed) when the
    head is not a plain projection (a LoRA-adapted head) or the model transforms its logits (Gemma's
    soft-capping). With an adapter and added tokens the head is peft's wrapper, around a trained copy or
    around the frozen head with trained rows: what the wrapper holds is replaced, so peft still finds,
    trains and saves it under the same keys."""
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        return None
    head = model.get_output_embeddings()
    if (copies := _peft_wrapper(head, "ModulesToSaveWrapper")) is not None:
        name = copies.active_adapters[0]
        if type(copies.modules_to_save[name]) is not torch.nn.Linear:
            return None
        replacement = ChunkedLossHead(copies.modules_to_save[name])
        copies.modules_to_save[name] = replacement
        return replacement
    if (token_rows := _peft_wrapper(head, "TrainableTokensWrapper")) is not None:
        layer = token_rows.token_adapter
        if type(layer.base_layer) is not torch.nn.Linear or layer.base_layer.bias is not None:
            return None
        replacement = object.__new__(_token_rows_head_class())  # the same layer, with our forward
        replacement.__dict__.update(layer.__dict__, original=[layer])
        token_rows.token_adapter = replacement
        return replacement
    if type(head) is not torch.nn.Linear:
        return None
    replacement = ChunkedLossHead(head)
    model.set_output_embeddings(replacement)
    return replacement


def restore_head(model: Any) -> None:
    head = model.get_output_embeddings()
    if (copies := _peft_wrapper(head, "ModulesToSaveWrapper")) is not None:
        for name, module in copies.modules_to_save.items():
            if isinstance(module, ChunkedLossHead):
                copies.modules_to_save[name] = module.original[0]
    elif (token_rows := _peft_wrapper(head, "TrainableTokensWrapper")) is not None:
        if isinstance(token_rows.token_adapter, _LossTargets):
            token_rows.token_adapter = token_rows.token_adapter.original[0]
    elif isinstance(head, ChunkedLossHead):
        model.set_output_embeddings(head.original[0])
