"""Preparation pipeline: read and validate every row, tokenize with masks, drop/truncate what does not
fit (counted), split off the evaluation set, and cache the result under a content fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dolphin_train.config.schema import Config
from dolphin_train.data.encode import KEPT, NO_TRAINABLE, TOO_LONG, TRUNCATED, ConversationEncoder
from dolphin_train.data.formats import RowConverter, RowProblem
from dolphin_train.data.report import PreparationReport
from dolphin_train.data.sources import Source, iter_source_rows, resolve_source, sources_fingerprint
from dolphin_train.data.templates import ChatMLTemplate, Template, TokenizerTemplate
from dolphin_train.errors import DataError, DolphinError

log = logging.getLogger(__name__)

# Bump when the prepared format or the masking rule changes, so old caches are not reused.
PREPARED_FORMAT_VERSION = 1
MAX_LISTED_PROBLEMS = 20


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length
    eval: Any | None
    report: PreparationReport
    path: Path


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything in the tokenizer that changes ids: vocabulary, merges, added tokens, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("a fast (Rust) tokenizer is required: the masking uses its character offsets")
    return hashlib.sha256((backend.to_str() + str(tokenizer.chat_template)).encode()).hexdigest()


def data_fingerprint(cfg: Config, tokenizer: Any, sources: list[Source]) -> str:
    """Keyed by the data files' contents (not their paths), the tokenizer, and every key that changes
    tokens, labels or the split: editing a file, a token or `sequence_len` prepares afresh."""
    token_keys = {
        "version": PREPARED_FORMAT_VERSION,
        "datasets": [d.model_dump(exclude={"path"}) for d in cfg.datasets],
        "chat_template": cfg.chat_template,
        "default_system_message": cfg.default_system_message,
        "skip_invalid_rows": cfg.skip_invalid_rows,
        "shuffle_merged_datasets": cfg.shuffle_merged_datasets,
        "sequence_len": cfg.sequence_len,
        "excess_length_strategy": cfg.excess_length_strategy,
        "train_on_inputs": cfg.train_on_inputs,
        "val_set_size": cfg.val_set_size,
        "seed": cfg.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": sources_fingerprint(sources),
    }
    return hashlib.sha256(json.dumps(token_keys, sort_keys=True).encode()).hexdigest()[:16]


def _canonical_rows(
    cfg: Config, sources: list[Source], problems: list[str], counts: dict[str, int], skipped: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """Validate every row of every dataset; yield the good ones, record the bad ones (file and line)."""
    for source in sources:
        convert = RowConverter(source.config, cfg.default_system_message, cfg.train_on_inputs)
        n = 0
        for raw in iter_source_rows(source):
            n += 1
            try:
                if raw.problem:
                    raise RowProblem("invalid JSON", raw.problem)
                yield convert(raw.value)
            except RowProblem as exc:
                if cfg.skip_invalid_rows:
                    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                else:
                    problems.append(f"{raw.where}: {exc}")
        counts[source.config.path] = n


def _default_num_proc(cfg: Config, rows: int) -> int:
    if cfg.dataset_num_proc:
        return cfg.dataset_num_proc
    # Worker processes cost a second or two to start: only worth it for larger datasets.
    return 1 if rows < 5000 else min(8, os.cpu_count() or 1)


def _raise_on_problems(problems: list[str]) -> None:
    if not problems:
        return
    listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(f"{len(problems)} malformed row(s); nothing was tokenized:\n{listed}{more}")


def canonical_features() -> Any:
    """The schema of canonical rows (given explicitly, so that zero rows is not a schema error)."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "kind": Value("string"),
            "roles": Sequence(Value("string")),
            "contents": Sequence(Value("string")),
            "train": Sequence(Value("bool")),
            "train_end": Sequence(Value("bool")),
        }
    )


def _unwrap_generation_errors(build: Any, *args: Any, **kwargs: Any) -> Any:
    """`datasets` wraps errors raised while reading; ours are already meant for people."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return build(*args, **kwargs)
    except DatasetGenerationError as exc:
        if isinstance(exc.__cause__, DolphinError):
            raise exc.__cause__ from None
        raise


def _template(cfg: Config, tokenizer: Any) -> Template:
    if cfg.chat_template == "tokenizer_default":
        try:
            return TokenizerTemplate(tokenizer)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    return ChatMLTemplate()


def _tokenize(cfg: Config, tokenizer: Any, sources: list[Source], work_dir: Path) -> tuple[Any, PreparationReport]:
    import datasets

    problems: list[str] = []
    report = PreparationReport(sequence_len=cfg.sequence_len)
    try:
        canonical = _unwrap_generation_errors(
            datasets.Dataset.from_generator,
            _canonical_rows,
            gen_kwargs={
                "cfg": cfg,
                "sources": tuple(sources),  # a tuple: datasets would try to shard over a list
                "problems": problems,
                "counts": report.rows_read,
                "skipped": report.skipped_invalid,
            },
            features=canonical_features(),
            cache_dir=str(work_dir / "hf_cache"),
            keep_in_memory=False,
        )
    except ValueError:  # `datasets` refuses a split with no rows
        _raise_on_problems(problems)
        raise DataError("the datasets hold no usable rows") from None
    _raise_on_problems(problems)
    if len(canonical) == 0:
        raise DataError("the datasets hold no usable rows")
    if cfg.shuffle_merged_datasets and len(cfg.datasets) > 1:
        canonical = canonical.shuffle(seed=cfg.seed)
    encoder = ConversationEncoder(
        tokenizer,
        cfg.sequence_len,
        cfg.train_on_inputs,
        truncate=cfg.excess_length_strategy == "truncate",
        template=_template(cfg, tokenizer),
    )
    tokenized = canonical.map(
        encoder,
        batched=True,
        batch_size=1000,
        num_proc=_default_num_proc(cfg, len(canonical)),
        remove_columns=canonical.column_names,
        desc="Tokenizing",
    )
    status = np.asarray(tokenized["status"])
    counts = np.bincount(status, minlength=4)
    report.kept = int(counts[KEPT] + counts[TRUNCATED])
    report.truncated = int(counts[TRUNCATED])
    report.dropped_too_long = int(counts[TOO_LONG])
    report.dropped_no_trainable = int(counts[NO_TRAINABLE])
    keep = np.flatnonzero((status == KEPT) | (status == TRUNCATED))
    kept = tokenized.select(keep).remove_columns(["status"])
    if len(kept) == 0:
        raise DataError(
            f"no row is left to train on: {report.dropped_too_long} longer than sequence_len "
            f"({cfg.sequence_len}), {report.dropped_no_trainable} with no trainable token"
        )
    lengths = np.asarray(kept["length"])
    report.tokens = int(lengths.sum())
    report.trainable_tokens = int(np.asarray(kept["trainable"]).sum())
    report.longest = int(lengths.max())
    return kept, report


def _split(cfg: Config, dataset: Any) -> tuple[Any, Any | None]:
    if not cfg.val_set_size:
        return dataset, None
    size = cfg.val_set_size if cfg.val_set_size < 1 else int(cfg.val_set_size)
    if (size >= 1 and size >= len(dataset)) or (size < 1 and round(size * len(dataset)) < 1):
        raise DataError(
            f"val_set_size {cfg.val_set_size} leaves no rows for training or evaluation ({len(dataset)} rows)"
        )
    split = dataset.train_test_split(test_size=size, seed=cfg.seed, shuffle=True)
    return split["train"], split["test"]


def _load_cached(path: Path) -> PreparedData:
    import datasets

    report = PreparationReport.from_json((path / "report.json").read_text())
    report.from_cache = True
    train = datasets.load_from_disk(str(path / "train"))
    eval_set = datasets.load_from_disk(str(path / "eval")) if (path / "eval").exists() else None
    return PreparedData(train, eval_set, report, path)


def prepare_data(cfg: Config, tokenizer: Any) -> PreparedData:
    """Prepared data for this config: from the cache when the fingerprint matches, else built and cached.

    The cache entry is written to a temporary directory and renamed into place, so an interrupted run
    never leaves a half-written entry that a later run would trust.
    """
    sources = [resolve_source(ds) for ds in cfg.datasets]
    fingerprint = data_fingerprint(cfg, tokenizer, sources)
    root = Path(cfg.dataset_prepared_path)
    final = root / fingerprint
    if (final / "report.json").exists():
        log.info("Reusing prepared data from %s", final)
        return _load_cached(final)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{fingerprint}-", dir=root))
    try:
        dataset, report = _tokenize(cfg, tokenizer, sources, work)
        train, eval_set = _split(cfg, dataset)
        report.train_rows, report.eval_rows = len(train), (len(eval_set) if eval_set is not None else 0)
        report.fingerprint = fingerprint
        out = work / "out"
        train.save_to_disk(str(out / "train"))
        if eval_set is not None:
            eval_set.save_to_disk(str(out / "eval"))
        (out / "report.json").write_text(report.to_json())
        if final.exists():  # another process won the race with the same content
            shutil.rmtree(out)
        else:
            out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("Prepared data saved to %s", final)
    prepared = _load_cached(final)
    prepared.report.from_cache = False
    return prepared
