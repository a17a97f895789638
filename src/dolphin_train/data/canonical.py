"""First pass of preparation: every raw row → a canonical row, or a problem naming its file and line.

The result is Arrow-backed (memory stays flat in the number of rows). JSON Lines files, the common
case at scale, are read by Arrow as lines and parsed in parallel worker processes; other sources
(JSON arrays, Parquet, CSV, Arrow, hub datasets) stream through a generator. Nothing is tokenized
here: a malformed dataset fails before any tokenization.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dolphin_train.config.schema import Config
from dolphin_train.data.formats import RowConverter, RowProblem
from dolphin_train.data.sources import RawRow, Source, iter_source_rows, parse_json_line
from dolphin_train.errors import DolphinError
from dolphin_train.terminal import bars_wanted, datasets_bars, verbose

ROW_OK, ROW_BLANK, ROW_INVALID = 0, 1, 2
PARALLEL_READ_MIN_ROWS = 50_000
CANONICAL_COLUMNS = ("kind", "roles", "contents", "train", "train_end")
_EMPTY = {"kind": "", "roles": [], "contents": [], "train": [], "train_end": []}


def canonical_features() -> Any:
    """Given explicitly, so that a part with no valid row is not a schema error."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "kind": Value("string"),
            "roles": Sequence(Value("string")),
            "contents": Sequence(Value("string")),
            "train": Sequence(Value("bool")),
            "train_end": Sequence(Value("bool")),
            "status": Value("int8"),
            "where": Value("string"),
            "reason": Value("string"),
            "problem": Value("string"),
        }
    )


def _problem_row(where: str, exc: RowProblem) -> dict[str, Any]:
    return {**_EMPTY, "status": ROW_INVALID, "where": where, "reason": exc.reason, "problem": str(exc)}


def _good_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    return {**row, "status": ROW_OK, "where": where, "reason": "", "problem": ""}


class JsonlBatch:
    """`datasets.map` function over the lines of one JSONL file (picklable for worker processes)."""

    def __init__(self, convert: RowConverter, path: str) -> None:
        self.convert = convert
        self.path = path

    def __call__(self, batch: dict[str, list[str]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [self._one(line, index) for line, index in zip(batch["text"], indices, strict=True)]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}

    def _one(self, line: str, index: int) -> dict[str, Any]:
        # Arrow keeps blank lines, so index + 1 is the line number.
        where = f"{self.path}:{index + 1}"
        if not line.strip():
            return _blank_row(where)
        return _converted(parse_json_line(where, line), self.convert)


def _blank_row(where: str) -> dict[str, Any]:
    return {**_EMPTY, "status": ROW_BLANK, "where": where, "reason": "", "problem": ""}


def _converted(raw: RawRow, convert: RowConverter) -> dict[str, Any]:
    if raw.blank:
        return _blank_row(raw.where)
    try:
        if raw.problem:
            raise RowProblem(raw.reason, raw.problem)
        return _good_row(convert(raw.value), raw.where)
    except RowProblem as exc:
        return _problem_row(raw.where, exc)


def _generated_rows(source: Source, convert: RowConverter) -> Iterator[dict[str, Any]]:
    for raw in iter_source_rows(source):
        yield _converted(raw, convert)


def _is_jsonl(path: Path, source: Source) -> bool:
    return (source.config.ds_type in (None, "json")) and path.suffix == ".jsonl"


@dataclass
class CanonicalData:
    dataset: Any  # canonical rows only (valid ones), columns CANONICAL_COLUMNS and `where` (file and line)
    rows_read: dict[str, int] = field(default_factory=dict)  # per dataset path, blank lines excluded
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (where, reason, detail)
    blank_lines: dict[str, int] = field(default_factory=dict)  # per file
    empty_files: list[str] = field(default_factory=list)  # 0 bytes (or only whitespace): no row
    skipped_files: list[str] = field(default_factory=list)  # in a dataset directory, not data (notes.txt)


def _is_empty(path: Path) -> bool:
    size = path.stat().st_size
    return size == 0 or (size < 4096 and not path.read_bytes().strip())


def _readable_as_text(lines_of: Any, path: Path) -> Any | None:
    """Arrow's line reader over one JSONL file, or None when it cannot read it (bytes that are not UTF-8):
    that file then goes through our own reader, which names each such line."""
    try:
        return lines_of(path)
    except Exception:  # `datasets` wraps the decoding error in its own generation error
        return None


def _parts(cfg: Config, source: Source, work_dir: Path, num_proc: int | None, generic: bool = False) -> list[Any]:
    import datasets

    convert = RowConverter(source.config, cfg.default_system_message, cfg.train_on_inputs)
    cache = str(work_dir / "hf_cache")
    parts = []
    if not generic and not source.hub and all(_is_jsonl(p, source) for p in source.files):
        for path in source.files:
            lines = _readable_as_text(
                lambda p: datasets.load_dataset("text", data_files=str(p), split="train", cache_dir=cache), path
            )
            if lines is None:
                parts += _parts(cfg, Source(source.config, files=(path,), hub=False), work_dir, None, generic=True)
                continue
            with datasets_bars(bars_wanted() or verbose()):
                parts.append(
                    lines.map(
                        JsonlBatch(convert, str(path)),
                        batched=True,
                        with_indices=True,
                        batch_size=1000,
                        # Parsing costs ~0.1 ms a row: worker processes pay off only for large files.
                        num_proc=num_proc if num_proc and len(lines) >= PARALLEL_READ_MIN_ROWS else None,
                        remove_columns=["text"],
                        features=canonical_features(),
                        new_fingerprint=f"canonical-{len(parts)}",
                        desc=f"Reading {path.name}",
                    )
                )
        return parts
    try:
        parts.append(
            datasets.Dataset.from_generator(
                _generated_rows,
                gen_kwargs={"source": source, "convert": convert},
                features=canonical_features(),
                cache_dir=cache,
            )
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, DolphinError):  # ours are already meant for people
            raise exc.__cause__ from None
        raise
    except ValueError:  # `datasets` refuses a generator that yields no row at all
        pass
    return parts


def _label(source: Source) -> str:
    """The dataset as the report names it: its path, and what selects within it (the same hub id or directory
    may be listed twice, with different splits, configurations or files)."""
    ds = source.config
    parts = [f"{k}={v}" for k, v in (("name", ds.name), ("split", ds.split), ("data_files", ds.data_files))
             if v is not None and not (k == "split" and v == "train")]  # fmt: skip
    return f"{ds.path} ({', '.join(parts)})" if parts else ds.path


def load_canonical(cfg: Config, sources: list[Source], work_dir: Path, num_proc: int | None) -> CanonicalData:
    import datasets

    result = CanonicalData(dataset=None)
    kept_parts = []
    for source in sources:
        read = 0
        result.skipped_files += [str(p) for p in source.skipped]
        empty = [p for p in source.files if _is_empty(p)]
        result.empty_files += [str(p) for p in empty]
        if empty:
            source = replace(source, files=tuple(p for p in source.files if p not in empty))
        for part in _parts(cfg, source, work_dir, num_proc) if source.hub or source.files else []:
            status = part.with_format("arrow")["status"].to_numpy()  # not a Python object per row
            read += int((status != ROW_BLANK).sum())
            blank = np.flatnonzero(status == ROW_BLANK)
            for where in part.select(blank)["where"] if len(blank) else []:
                name = where.rsplit(":", 1)[0]
                result.blank_lines[name] = result.blank_lines.get(name, 0) + 1
            bad = np.flatnonzero(status == ROW_INVALID)
            if len(bad):
                invalid = part.select(bad)
                result.problems += list(zip(invalid["where"], invalid["reason"], invalid["problem"], strict=True))
            kept_parts.append(part.select(np.flatnonzero(status == ROW_OK)))
        result.rows_read[_label(source)] = result.rows_read.get(_label(source), 0) + read
    if kept_parts:
        merged = datasets.concatenate_datasets(kept_parts)
        # `where` stays: a row the chat template rejects at tokenization is named by its file and line.
        result.dataset = merged.select_columns([*CANONICAL_COLUMNS, "where"])
    return result
