"""Read raw rows from files or hub datasets, remembering where each came from for error messages.

JSON Lines and CSV are read by our own line readers (so a broken line is reported by its number,
instead of failing the whole file inside a library); Parquet and Arrow files and hub datasets go
through `datasets`, and their rows are named by index.

Hub datasets offline (`HF_HUB_OFFLINE=1`): `datasets` 5.2 then only finds a hub id in its own cache of
prepared datasets (`$HF_HOME/datasets/org___name/...`, written by an earlier online `load_dataset`), not in
the hub's file cache. So offline, a hub id whose files are in the hub cache (`$HF_HUB_CACHE/datasets--org--
name/snapshots/<rev>/`, as `hf download --repo-type dataset org/name` or any earlier download leaves them)
is loaded from that snapshot directory: its README's configs (`name`), `data_files`, and split slices such as
`train[:20%]` work as they do online.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolphin_train.config.schema import DatasetConfig
from dolphin_train.errors import DataError, where_not_utf8

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BYTES_PER_CONVERSATION = 2000  # on disk, a typical chat row: the guess used before rows are counted


def guessed_rows(size_bytes: int) -> int:
    """Rows in a data file of this size, before anything is read (worker counts, `plan` estimates)."""
    return size_bytes // BYTES_PER_CONVERSATION


@dataclass(frozen=True)
class RawRow:
    where: str  # "path:line" (JSONL), "path[index]" (JSON array, Parquet, CSV, Arrow, hub)
    value: Any  # the parsed row, or None when it could not be parsed
    problem: str | None = None  # why it could not be parsed
    reason: str = "invalid JSON"  # the kind of problem, as the report counts skipped rows
    blank: bool = False  # a blank line of a JSON Lines file: no row, counted per file


@dataclass(frozen=True)
class Source:
    """What one `datasets:` entry resolves to: local files, or a hub dataset."""

    config: DatasetConfig
    files: tuple[Path, ...] = ()
    hub: bool = False
    snapshot: Path | None = None  # offline: the hub dataset's files in the hub cache (the path names the revision)
    skipped: tuple[Path, ...] = ()  # files of a dataset directory that are not data (README.md, notes.txt)

    def fingerprint(self, digest: Any) -> None:
        """Local files: their contents. Hub datasets: their id, configuration and split (and the cached revision
        when loaded offline from the hub cache)."""
        if self.hub:
            digest.update(json.dumps(self.config.model_dump(), sort_keys=True).encode())
            digest.update(str(self.snapshot or "").encode())
            return
        for path in self.files:
            digest.update(str(path.name).encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    # "org/name" with no file extension: "data/chat.jsonl" that is missing is a missing file, not a hub id.
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and Path(path).suffix not in FILE_TYPES


def _supported(path: Path, ds: DatasetConfig) -> bool:
    return ds.ds_type is not None or path.suffix in FILE_TYPES


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _inside(path: Path, directories: tuple[Path, ...]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(d) for d in directories)


def resolve_source(ds: DatasetConfig, exclude: tuple[str | Path, ...] = ()) -> Source:
    """Expand `path` (file, directory, glob; `data_files` inside a directory) or recognise a hub id.
    `exclude`: directories never read as data (the run's prepared-data cache and output directory, when they
    sit inside a dataset directory)."""
    path = ds.path
    local = Path(path).expanduser()
    excluded = tuple(Path(d).expanduser().resolve() for d in exclude)
    skipped: list[Path] = []
    if any(ch in path for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(local), recursive=True)) if Path(p).is_file()]
        files = [f for f in files if not _inside(f, excluded)]
        if not files:
            raise DataError(f"dataset {path}: the pattern matches no file")
    elif local.is_dir():
        if ds.data_files:
            names = [ds.data_files] if isinstance(ds.data_files, str) else ds.data_files
            files = [local / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise DataError(f"dataset {path}: data_files not found: {', '.join(missing)}")
        else:
            found = sorted(p for p in local.rglob("*") if p.is_file() and not _inside(p, excluded))
            files = [p for p in found if p.suffix in FILE_TYPES]
            # Listed in the report; hidden ones (.gitattributes, a hub download's .cache/) are not worth a word.
            skipped = [p for p in found if p.suffix not in FILE_TYPES and not _hidden(p.relative_to(local))]
        if not files:
            raise DataError(f"dataset {path}: the directory holds no .jsonl/.json/.parquet/.csv/.arrow file")
    elif local.is_file():
        files = [local]
    elif _looks_like_hub_id(path):
        return Source(ds, hub=True, snapshot=_offline_snapshot(path))
    else:
        raise DataError(
            f"dataset not found: {path} (relative paths are resolved from the current directory, {Path.cwd()})"
        )
    unsupported = [str(f) for f in files if not _supported(f, ds)]
    if unsupported:
        raise DataError(
            f"dataset {path}: unsupported file type for {', '.join(unsupported)} "
            f"(use .jsonl, .json, .parquet, .csv or .arrow, or set ds_type)"
        )
    return Source(ds, files=tuple(files), skipped=tuple(skipped))


def _offline_snapshot(repo_id: str) -> Path | None:
    """Offline, the hub cache's copy of this dataset repository (latest cached revision of `main`), if any."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def sources_fingerprint(sources: list[Source]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        source.fingerprint(digest)
    return digest.hexdigest()


def iter_source_rows(source: Source) -> Iterator[RawRow]:
    if source.hub:
        yield from _iter_hub(source.config, source.snapshot)
        return
    for path in source.files:
        kind = source.config.ds_type or FILE_TYPES[path.suffix]
        if kind == "json" and path.suffix != ".json":
            yield from _iter_jsonl(path)
        elif kind == "json":
            yield from _iter_json_array(path)
        elif kind == "csv":
            yield from _iter_csv(path)
        else:
            yield from _iter_with_datasets(path, kind)


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    """One object per line; blank lines marked (counted per file); a broken line, or one that is not UTF-8
    text, is reported, not fatal here."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(where, None, where_not_utf8(raw, exc)[1], reason="not UTF-8 text")
                continue
            if not line.strip():
                yield RawRow(where, None, blank=True)
                continue
            yield parse_json_line(where, line)


def _decode_whole(path: Path) -> str:
    """A whole file as UTF-8 text, or a DataError naming the first line that is not."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, said = where_not_utf8(raw, exc)
        raise DataError(f"{path}:{line}: {said} (save the file as UTF-8)") from None


def parse_json_line(where: str, line: str) -> RawRow:
    """One JSON Lines row; a broken line becomes a reported problem, not an exception."""
    try:
        return RawRow(where, json.loads(line))
    except json.JSONDecodeError as exc:
        return RawRow(where, None, f"invalid JSON ({exc.msg} at column {exc.colno})")


def _iter_json_array(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Many ".json" files are really JSON Lines (a line that is not UTF-8 is then named by its number).
        yield from _iter_jsonl(path)
        return
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    for index, value in enumerate(data):
        yield RawRow(f"{path}[{index}]", value)


def _iter_csv(path: Path) -> Iterator[RawRow]:
    """The standard library's reader keeps every cell as text ("42" is an answer, not a number) and
    knows each row's line; a header row names the columns."""
    import io

    with io.StringIO(_decode_whole(path), newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            yield RawRow(f"{path}:{reader.line_num}", dict(row))


def _iter_with_datasets(path: Path, kind: str) -> Iterator[RawRow]:
    import datasets

    try:
        if kind == "arrow":
            table = datasets.Dataset.from_file(str(path))
        else:
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # the library's many error types all mean "cannot read this file"
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None
    for index, value in enumerate(table):
        yield RawRow(f"{path}[{index}]", value)


def _iter_hub(ds: DatasetConfig, snapshot: Path | None) -> Iterator[RawRow]:
    import datasets

    try:
        table = datasets.load_dataset(str(snapshot or ds.path), name=ds.name, split=ds.split, data_files=ds.data_files)
    except Exception as exc:
        where = f" (offline, from the hub cache: {snapshot})" if snapshot else ""
        raise DataError(f"cannot load the hub dataset {ds.path!r}{where}: {exc}") from None
    for index, value in enumerate(table):
        yield RawRow(f"{ds.path}[{ds.split}][{index}]", value)
