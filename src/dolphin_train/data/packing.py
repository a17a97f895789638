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
from tqdm.auto import tqdm

from dolphin_train.config.schema import Config
from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.data.prepare import PreparedData
from dolphin_train.process_group import is_main_process
from dolphin_train.terminal import bars_wanted

# Conversations placed between progress-bar updates: keeps the bar's cost out of the inner loop.
PROGRESS_CHUNK = 1 << 16


class _BinsByFreeSpace:
    """Open bins indexed by their free space. Free space takes at most `capacity + 1` distinct values, so
    a small sorted list of them finds the fullest bin that still fits an item in O(log n)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.bins: list[list[int]] = []
        self.free_values: list[int] = []  # sorted distinct free-space values that some bin has
        self.bins_with_free: dict[int, list[int]] = {}  # free space -> bin ids

    def place(self, idx: int, size: int) -> None:
        pos = bisect.bisect_left(self.free_values, size)
        if pos < len(self.free_values):
            free = self.free_values[pos]
            bin_id = self.bins_with_free[free].pop()
            if not self.bins_with_free[free]:
                del self.bins_with_free[free]
                self.free_values.pop(pos)
        else:
            bin_id, free = len(self.bins), self.capacity
            self.bins.append([])
        self.bins[bin_id].append(idx)
        remaining = free - size
        if remaining > 0:
            if remaining not in self.bins_with_free:
                bisect.insort(self.free_values, remaining)
                self.bins_with_free[remaining] = []
            self.bins_with_free[remaining].append(bin_id)


def best_fit_decreasing(lengths: np.ndarray, capacity: int, progress: bool = False) -> list[list[int]]:
    """Assign item indices to bins of `capacity` tokens: longest first, each into the fullest bin that
    still fits it. O(n log n): about 1 s per million conversations. With `progress`, a bar appears when
    packing takes more than a second (so small datasets print nothing)."""
    if len(lengths) and int(np.max(lengths)) > capacity:
        raise ValueError(f"an item of {int(np.max(lengths))} tokens exceeds the bin capacity {capacity}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    sizes = np.asarray(lengths)[order]
    bins = _BinsByFreeSpace(capacity)
    bar = tqdm(total=len(order), desc="Packing", unit=" conversations", unit_scale=True, delay=1.0,
               disable=not progress)  # fmt: skip
    with bar:
        for start in range(0, len(order), PROGRESS_CHUNK):
            chunk = slice(start, start + PROGRESS_CHUNK)
            for idx, size in zip(order[chunk].tolist(), sizes[chunk].tolist(), strict=True):
                bins.place(idx, size)
            bar.update(len(order[chunk]))
    return bins.bins


def next_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Assign item indices to bins in their order: each item joins the current bin, or closes it and opens
    the next when it does not fit (`sample_packing_sequentially`). Order is kept within and across bins;
    only the current bin is ever open, so it fills less well than best fit."""
    sizes = np.asarray(lengths)
    if len(sizes) and int(np.max(sizes)) > capacity:
        raise ValueError(f"an item of {int(np.max(sizes))} tokens exceeds the bin capacity {capacity}")
    bins: list[list[int]] = []
    free = 0
    for idx, size in enumerate(sizes.tolist()):
        if not bins or size > free:
            bins.append([])
            free = capacity
        bins[-1].append(idx)
        free -= size
    return bins


@dataclass(frozen=True)
class PackingLayout:
    """Which conversations share each packed row (`bins`: conversation indices per row, in training order)."""

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


@dataclass(frozen=True)
class PackingOrder:
    """How conversations are packed: next fit in their order (`sample_packing_sequentially`) or best fit by
    length, and whether the rows keep their order (`curriculum_sampling`) or are shuffled with the seed."""

    sequential: bool = False
    in_order: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> PackingOrder:
        return cls(cfg.sample_packing_sequentially, cfg.curriculum_sampling)


def pack_conversations(
    lengths: np.ndarray, capacity: int, seed: int, progress: bool = False, order: PackingOrder | None = None
) -> PackingLayout:
    """Best-fit-decreasing bins (or next-fit ones) in a seeded random order, so long rows are not all at the
    start; in their own order with `order.in_order`."""
    order = order or PackingOrder()
    bins = next_fit(lengths, capacity) if order.sequential else best_fit_decreasing(lengths, capacity, progress)
    if not order.in_order:
        rng = np.random.default_rng(seed)
        bins = [bins[i] for i in rng.permutation(len(bins))]
    return PackingLayout(bins, capacity, int(np.sum(lengths)))


class PackedRows:
    """A map-style dataset of packed rows over a tokenized `datasets.Dataset` (read lazily)."""

    def __init__(self, dataset: Any, layout: PackingLayout) -> None:
        self.dataset = dataset
        self.layout = layout

    def __len__(self) -> int:
        return len(self.layout.bins)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        rows = self.dataset[self.layout.bins[i]]
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


class PaddedToEvenShards:
    """Evaluation rows followed by empty rows (no trained token) up to a multiple of `multiple` (processes x
    batch size). Why: when the evaluation set does not divide evenly, accelerate repeats rows from its start
    to keep the processes in step, and a repeated row would count twice in the token-weighted evaluation
    loss; an empty row counts nothing."""

    def __init__(self, rows: Any, multiple: int, pad_token_id: int) -> None:
        self.rows = rows
        self.length = -(-len(rows) // multiple) * multiple
        self.empty = {"input_ids": [pad_token_id], "labels": [IGNORE_INDEX], "position_ids": [0]}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.rows[i] if i < len(self.rows) else dict(self.empty)


@dataclass(frozen=True)
class TrainingRows:
    """The rows the Trainer iterates, and how they were packed (None when not packed)."""

    train: Any
    eval: Any | None
    train_layout: PackingLayout | None
    eval_layout: PackingLayout | None


def build_training_rows(cfg: Config, prepared: PreparedData) -> TrainingRows:
    """Packed rows (`sample_packing`, `eval_sample_packing`) or one conversation per row: what training
    iterates and what `plan` counts steps from."""

    def rows(dataset: Any, packed: bool, seed: int) -> tuple[Any, PackingLayout | None]:
        if dataset is None:
            return None, None
        if not packed:
            return SingleRows(dataset), None
        lengths = np.asarray(dataset["length"], dtype=np.int64)
        progress = is_main_process() and bars_wanted()
        layout = pack_conversations(lengths, cfg.sequence_len, seed, progress, PackingOrder.from_config(cfg))
        return PackedRows(dataset, layout), layout

    train, train_layout = rows(prepared.train, cfg.sample_packing, cfg.seed)
    eval_rows, eval_layout = rows(prepared.eval, cfg.eval_packing, cfg.seed + 1)
    return TrainingRows(train, eval_rows, train_layout, eval_layout)
