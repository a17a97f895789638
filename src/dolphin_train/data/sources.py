"""Read raw rows from local files, remembering where each came from (file and line) for error messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolphin_train.errors import DataError


@dataclass(frozen=True)
class RawRow:
    where: str  # "path:line" (JSONL) or "path[index]" (JSON array)
    value: Any  # the parsed row, or None when it could not be parsed
    problem: str | None = None  # why it could not be parsed


def resolve_data_path(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"dataset not found: {path} (relative paths are resolved from the current directory, {Path.cwd()})"
        )
    if p.is_dir():
        raise DataError(f"dataset {path} is a directory; point `path` at a .jsonl or .json file")
    if p.suffix not in (".jsonl", ".json"):
        raise DataError(f"dataset {path}: unsupported file type {p.suffix!r} (use .jsonl or .json)")
    return p


def iter_raw_rows(path: Path) -> Iterator[RawRow]:
    """Yield every row of a JSONL file (one object per line; blank lines skipped) or a JSON array."""
    if path.suffix == ".json":
        yield from _iter_json_array(path)
        return
    with path.open("r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield RawRow(where, json.loads(line))
            except json.JSONDecodeError as exc:
                yield RawRow(where, None, f"invalid JSON ({exc.msg} at column {exc.colno})")


def _iter_json_array(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, dict):  # a JSON file holding one JSONL-style object per line also parses here
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    for index, value in enumerate(data):
        yield RawRow(f"{path}[{index}]", value)
