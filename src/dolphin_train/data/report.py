"""The preparation report: what happened to every row, shown to the user and cached with the data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PreparationReport:
    """What happened to every row: nothing is dropped or truncated without being counted here."""

    rows_read: dict[str, int] = field(default_factory=dict)  # per dataset path
    skipped_invalid: dict[str, int] = field(default_factory=dict)  # per reason (skip_invalid_rows: true)
    blank_lines: dict[str, int] = field(default_factory=dict)  # per file: blank lines of JSON Lines files
    empty_files: list[str] = field(default_factory=list)  # data files with no content
    skipped_files: list[str] = field(default_factory=list)  # files in a dataset directory that are not data
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trainable: int = 0
    dropped_duplicates: int = 0  # dataset_exact_deduplication
    tokens: int = 0
    trainable_tokens: int = 0
    longest: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    sequence_len: int = 0
    fingerprint: str = ""
    engine: str = ""  # which tokenizer engine made the ids (both give the same ids)
    special_tokens_in_content: int = 0  # rows whose messages held special-token text
    special_tokens_kept: bool = False  # special_tokens_in_content: true (else tokenized as text)
    from_cache: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PreparationReport:
        return cls(**json.loads(text))

    def table(self) -> Any:
        """A rich Table for the console."""
        from rich.table import Table

        t = Table(title="Prepared data" + (" (from cache)" if self.from_cache else ""), show_header=False)
        t.add_column("what")
        t.add_column("value", justify="right")
        for path, n in self.rows_read.items():
            t.add_row(f"rows read: {path}", f"{n:,}")
        for reason, n in sorted(self.skipped_invalid.items()):
            t.add_row(f"skipped (invalid): {reason}", f"{n:,}")
        for path, n in self.blank_lines.items():
            t.add_row(f"blank lines: {path}", f"{n:,}")
        for path in self.empty_files:
            t.add_row(f"empty file: {path}", "0")
        for path in self.skipped_files:
            t.add_row(f"not a data file, not read: {path}", "-")
        t.add_row("kept", f"{self.kept:,}")
        t.add_row(f"truncated to {self.sequence_len} tokens", f"{self.truncated:,}")
        t.add_row(f"dropped: longer than {self.sequence_len} tokens", f"{self.dropped_too_long:,}")
        t.add_row("dropped: no trainable token", f"{self.dropped_no_trainable:,}")
        if self.dropped_duplicates:
            t.add_row("dropped: exact duplicates", f"{self.dropped_duplicates:,}")
        how = "kept as special tokens" if self.special_tokens_kept else "tokenized as text"
        t.add_row(f"rows with special-token text in a message ({how})", f"{self.special_tokens_in_content:,}")
        t.add_row("tokens (trainable)", f"{self.tokens:,} ({self.trainable_tokens:,})")
        t.add_row("longest row", f"{self.longest:,}")
        t.add_row("train / eval rows", f"{self.train_rows:,} / {self.eval_rows:,}")
        if self.engine:
            t.add_row("tokenizer engine", self.engine)
        t.add_row("fingerprint", self.fingerprint)
        return t
