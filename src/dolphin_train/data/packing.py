"""Sample packing: several conversations per row of `sequence_len` tokens.

Why our own code: packing decides both speed (padding wasted) and correctness (cross-contamination).
Bins are planned over the lengths only (best-fit decreasing), and rows are assembled lazily from the
Arrow-backed dataset, so memory stays flat in the number of conversations. Each conversation keeps
position ids that restart at 0; transformers derives the attention boundaries from them (flash-attn
varlen on GPU, a block-diagonal mask for SDPA on the CPU).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Assign item indices to bins of `capacity` tokens: longest first, each into the fullest bin that
    still fits it. Free space takes at most `capacity + 1` distinct values, so bins are indexed by their
    free space in a small sorted list: O(n log n) overall, fast at millions of conversations."""
    if len(lengths) and int(np.max(lengths)) > capacity:
        raise ValueError(f"an item of {int(np.max(lengths))} tokens exceeds the bin capacity {capacity}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free-space values that some bin has
    bins_with_free: dict[int, list[int]] = {}  # free space -> bin ids
    for idx in order.tolist():
        size = int(lengths[idx])
        pos = bisect.bisect_left(free_values, size)
        if pos < len(free_values):
            free = free_values[pos]
            bin_id = bins_with_free[free].pop()
            if not bins_with_free[free]:
                del bins_with_free[free]
                free_values.pop(pos)
        else:
            bin_id, free = len(bins), capacity
            bins.append([])
        bins[bin_id].append(idx)
        remaining = free - size
        if remaining > 0:
            if remaining not in bins_with_free:
                bisect.insort(free_values, remaining)
                bins_with_free[remaining] = []
            bins_with_free[remaining].append(bin_id)
    return bins


@dataclass(frozen=True)
class PackingPlan:
    bins: list[list[int]]
    capacity: int
    total_tokens: int

    @property
    def efficiency(self) -> float:
        """Real tokens / row capacity."""
        return self.total_tokens / max(1, len(self.bins) * self.capacity)

    @property
    def lower_bound_rows(self) -> int:
        return -(-self.total_tokens // self.capacity)


def plan_packing(lengths: np.ndarray, capacity: int, seed: int) -> PackingPlan:
    """Best-fit-decreasing bins in a seeded random order (so long rows are not all at the start)."""
    bins = best_fit_decreasing(lengths, capacity)
    rng = np.random.default_rng(seed)
    shuffled = [bins[i] for i in rng.permutation(len(bins))]
    return PackingPlan(shuffled, capacity, int(np.sum(lengths)))


class PackedRows:
    """A map-style dataset of packed rows over a tokenized `datasets.Dataset` (read lazily)."""

    def __init__(self, dataset: Any, plan: PackingPlan) -> None:
        self.dataset = dataset
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan.bins)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        rows = self.dataset[self.plan.bins[i]]
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for ids, lab in zip(rows["input_ids"], rows["labels"], strict=True):
            input_ids.extend(ids)
            labels.extend(lab)
            position_ids.extend(range(len(ids)))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class SingleRows:
    """Unpacked rows, one conversation each, with the same item shape as PackedRows."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        row = self.dataset[i]
        n = len(row["input_ids"])
        return {"input_ids": list(row["input_ids"]), "labels": list(row["labels"]), "position_ids": list(range(n))}
