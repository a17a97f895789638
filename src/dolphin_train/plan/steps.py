"""Tokens and steps for the plan: exact from the prepared-data cache when this config's entry exists,
otherwise estimated from a sample of the data files (and labelled so)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolphin_train.config.schema import Config
from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)
SAMPLE_ROWS = 200
BYTES_PER_TOKEN = 4.0  # English JSON text with a BPE vocabulary, when no tokenizer is at hand
ESTIMATED_PACKING = 0.99  # best-fit-decreasing fills ~99.9% of rows on real data (BENCHMARKS.md)
TOKENS_PER_TURN = 5  # ChatML markers and the role around each message
ROLE_KEYS = ("from", "role")  # their values become part of those 5 tokens


@dataclass(frozen=True)
class DataPlan:
    exact: bool
    conversations: int | None
    tokens: int | None
    train_rows: int | None  # packed rows when packing
    steps_per_epoch: int | None
    total_steps: int | None
    source: str  # where the numbers come from, shown to the user

    @property
    def known(self) -> bool:
        return self.total_steps is not None


def _unknown(reason: str) -> DataPlan:
    return DataPlan(False, None, None, None, None, None, reason)


def plan_data(cfg: Config, tokenizer: Any | None, gpus: int) -> DataPlan:
    from dolphin_train.data.sources import resolve_source

    try:
        sources = [resolve_source(ds, exclude=(cfg.dataset_prepared_path, cfg.output_dir)) for ds in cfg.datasets]
    except DolphinError as exc:
        return _unknown(f"unknown: {exc}")
    if any(s.hub for s in sources):
        return _unknown("unknown: hub datasets are counted when prepared (`dolphin-train preprocess`)")
    if tokenizer is not None:
        cached = _from_cache(cfg, tokenizer, sources, gpus)
        if cached is not None:
            return cached
    return _estimated(cfg, tokenizer, sources, gpus)


def _schedule(cfg: Config, rows: int, gpus: int) -> tuple[int, int]:
    from dolphin_train.train.schedule import compute_schedule

    schedule = compute_schedule(cfg, rows, max(1, gpus // cfg.cp_size), has_eval=False)  # a CP group: one batch
    return schedule.steps_per_epoch, schedule.total_steps


def _from_cache(cfg: Config, tokenizer: Any, sources: list[Any], gpus: int) -> DataPlan | None:
    import numpy as np

    from dolphin_train.data.packing import build_training_rows
    from dolphin_train.data.prepare import data_fingerprint, load_prepared, prepared_entry

    entry = prepared_entry(cfg, data_fingerprint(cfg, tokenizer, sources))
    if not (entry / "report.json").exists():
        return None
    prepared = load_prepared(entry)
    rows = len(build_training_rows(cfg, prepared).train)  # the rows training will see, packed the same way
    per_epoch, total = _schedule(cfg, rows, gpus)
    tokens = int(np.asarray(prepared.train["length"]).sum())
    return DataPlan(True, len(prepared.train), tokens, rows, per_epoch, total, f"exact: prepared data in {entry}")


def _sample_lines(path: Path) -> tuple[int, list[str], int]:
    """(rows, first rows, their bytes) of a JSONL file, counting newlines without parsing."""
    sample: list[str] = []
    rows = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            rows += block.count(b"\n")
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                sample.append(line)
            if len(sample) >= SAMPLE_ROWS:
                break
    return rows, sample, sum(len(s.encode()) for s in sample)


def _text_of(row: Any) -> tuple[list[str], int]:
    """(string values, number of turns) of a parsed row: what becomes tokens, without the JSON around it."""
    if isinstance(row, str):
        return [row], 0
    if isinstance(row, dict):
        values = [_text_of(v) for k, v in row.items() if k not in ROLE_KEYS]
        is_turn = any(k in row for k in ROLE_KEYS)
        return [t for texts, _ in values for t in texts], sum(n for _, n in values) + is_turn
    if isinstance(row, list):
        values = [_text_of(v) for v in row]
        return [t for texts, _ in values for t in texts], sum(n for _, n in values)
    return [], 0


def _row_tokens(tokenizer: Any | None, line: str) -> int | None:
    import json

    try:
        texts, turns = _text_of(json.loads(line))
    except ValueError:
        return None
    joined = "\n".join(texts)
    if tokenizer is not None:
        tokens = len(tokenizer(joined, add_special_tokens=False)["input_ids"])
    else:
        tokens = round(len(joined.encode()) / BYTES_PER_TOKEN)
    return tokens + TOKENS_PER_TURN * turns


def _bytes_per_kept_token(cfg: Config, tokenizer: Any | None, sample: list[str]) -> tuple[float, float]:
    """(file bytes per training token, share of rows kept), measured on the sampled rows: rows longer than
    `sequence_len` are dropped or truncated as the preparation will."""
    counted = [(len(line.encode()), _row_tokens(tokenizer, line)) for line in sample]
    counted = [(size, n) for size, n in counted if n is not None]
    if not counted:
        return BYTES_PER_TOKEN, 1.0
    truncate = cfg.excess_length_strategy == "truncate"
    kept = [min(n, cfg.sequence_len) for _, n in counted if truncate or n <= cfg.sequence_len]
    size = sum(size for size, _ in counted)
    return size / max(1, sum(kept)), len(kept) / len(counted)


def _estimated(cfg: Config, tokenizer: Any | None, sources: list[Any], gpus: int) -> DataPlan:
    from dolphin_train.data.sources import guessed_rows

    total_bytes = conversations = 0
    samples: list[str] = []
    for source in sources:
        for path in source.files:
            size = path.stat().st_size
            total_bytes += size
            if path.suffix in (".jsonl", ".json"):
                rows, sample, sampled = _sample_lines(path)
                conversations += (
                    rows if path.suffix == ".jsonl" else max(1, round(size / max(1, sampled) * len(sample)))
                )
                samples += sample
            else:
                conversations += guessed_rows(size)
    if total_bytes == 0:
        return _unknown("unknown: the data files are empty")
    per_token, kept_share = _bytes_per_kept_token(cfg, tokenizer, samples)
    tokens, conversations = int(total_bytes / per_token), int(conversations * kept_share)
    if cfg.val_set_size:
        keep = 1 - cfg.val_set_size if cfg.val_set_size < 1 else max(0.0, 1 - cfg.val_set_size / max(1, conversations))
        tokens, conversations = int(tokens * keep), int(conversations * keep)
    rows = math.ceil(tokens / (cfg.sequence_len * ESTIMATED_PACKING)) if cfg.sample_packing else conversations
    per_epoch, total = _schedule(cfg, max(1, rows), gpus)
    how = "the tokenizer" if tokenizer is not None else f"~{BYTES_PER_TOKEN:g} bytes per token"
    return DataPlan(
        False, conversations, tokens, rows, per_epoch, total,
        f"estimated from file sizes and {how} (run `dolphin-train preprocess` for exact numbers)",
    )  # fmt: skip
