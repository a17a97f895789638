"""The repeated decoder layers of a causal LM, found the same way by training (checkpointing which of
them, FLOP counts) and by `plan` (tracing their activations)."""

from __future__ import annotations

from typing import Any


def decoder_layers(model: Any) -> Any:
    """The repeated blocks: the longest ModuleList in the model."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return max(lists, key=len)
