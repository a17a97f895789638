"""Trained rows of added tokens without a whole-matrix copy at every step.

Why our own forward: peft's `TrainableTokensLayer` builds, at every forward pass, a copy of the whole
embedding (or output head) with the trained rows written in, and its backward pass produces a dense gradient
of that whole copy, only to keep the added tokens' rows of it. For Llama-3-8B in bf16 that is 1 GiB for the
copy and 1 GiB for its gradient, for the input embedding and again for the head, whose gradient also costs a
matrix product as large as the forward's. Here the frozen weight is used as it is, and only the positions
(input embedding) or the logit columns (head) of the added tokens take the trained rows: the same values and
the same gradients for the rows, and nothing of the matrix's size is allocated. peft still owns the rows:
it finds, saves, loads and merges them where it put them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F


def embed_with_rows(ids: torch.Tensor, embedding: torch.nn.Embedding, index: torch.Tensor, rows: torch.Tensor,
                    scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`embedding(ids)` with `rows` in place of the embedding's rows `index` (as peft's merged weight gives)."""
    out = F.embedding(ids, embedding.weight, embedding.padding_idx, embedding.max_norm, embedding.norm_type,
                      embedding.scale_grad_by_freq, embedding.sparse)  # fmt: skip
    slot, hit = _slots(ids, index)
    # Activation-sized; the gradient reaches only the picked rows (an embedding's backward: deterministic).
    picked = F.embedding(slot, rows.to(out.dtype))
    out = torch.where(hit.unsqueeze(-1), picked, out)
    return out if scale is None else out * scale.to(out.dtype)


def project_with_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
                      rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """`linear(hidden, weight, bias)` with the logit columns `index` computed from `rows` instead."""
    logits = F.linear(hidden, weight, bias)
    # In place: the frozen projection's backward needs its input and weight, never its output.
    return logits.index_copy_(-1, index, F.linear(hidden, rows.to(logits.dtype)))


def _slots(ids: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each id, its position in `index` (0 where absent) and whether it is there, without a table of the
    vocabulary's size."""
    ordered, order = torch.sort(index)
    found = torch.searchsorted(ordered, ids).clamp(max=len(index) - 1)
    return order[found], ordered[found] == ids


@cache
def lean_token_rows_class() -> type:
    """peft's layer of trainable token rows with a forward that copies nothing of the matrix's size."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    class LeanTokenRows(TrainableTokensLayer):
        def active_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
            """The one active adapter's token ids and their trained rows, in the frozen weight's dtype."""
            name, weight = self.active_adapters[0], self.base_layer.weight
            index = torch.tensor(self.token_indices[name], device=weight.device)
            return index, self.trainable_tokens_delta[name].to(weight.dtype)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return super().forward(x, *args, **kwargs)
            base = self.base_layer
            index, rows = self.active_rows()
            if isinstance(base, torch.nn.Embedding):
                return embed_with_rows(x, base, index, rows, self._get_embed_scale())
            if type(base) is torch.nn.Linear and base.bias is None:
                return project_with_rows(x, base.weight, None, index, rows)
            return super().forward(x, *args, **kwargs)

    return LeanTokenRows


def use_lean_token_rows(model: Any) -> Any:
    """Give every trainable-token-rows layer of a peft model the lean forward. The class of each layer is
    changed in place (peft has no hook to choose the layer's forward), so peft's own references stay valid."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in model.modules():
        if type(module) is TrainableTokensLayer:
            module.__class__ = lean_token_rows_class()
    return model
