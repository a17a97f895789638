"""Batch rows into tensors.

Every batch carries position ids that restart at 0 for each conversation (and for the padding), and no
attention mask: that is how transformers recognises packed sequences (a block-diagonal mask for SDPA/eager).
For our variable-length attention backends (`boundaries`), the batch also carries the sequence boundaries
over the flattened rows (`cu_seq_lens_q/k`, `max_length_q/k`), computed here once per batch on the CPU, which
the model hands to every attention layer. One format for packed and unpacked rows means one code path: an
unpacked padded row is simply a row holding one conversation and a padding "sequence".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dolphin_train.data.encode import IGNORE_INDEX


@dataclass(frozen=True)
class ChatCollator:
    pad_token_id: int
    pad_to: int | None = None  # sequence_len when pad_to_sequence_len, else pad to the longest row
    pad_to_multiple_of: int = 8  # friendlier shapes for GPU kernels; pads are never trained
    boundaries: bool = False  # add the sequence boundaries (the model runs our variable-length attention)

    def padded_length(self, rows: list[dict[str, list[int]]]) -> int:
        if self.pad_to:
            return self.pad_to
        longest = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        return -(-longest // m) * m

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        length = self.padded_length(rows)
        n = len(rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((n, length), dtype=torch.long)
        for i, row in enumerate(rows):
            k = len(row["input_ids"])
            input_ids[i, :k] = torch.tensor(row["input_ids"])
            labels[i, :k] = torch.tensor(row["labels"])
            position_ids[i, :k] = torch.tensor(row["position_ids"])
            # Padding forms its own "sequence" (positions restart at 0), so it never joins the last one.
            position_ids[i, k:] = torch.arange(length - k)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.boundaries:
            from dolphin_train.model.attention import sequence_boundaries

            batch.update(sequence_boundaries(position_ids))
        return batch
