"""Preparation pipeline: read and validate every row, tokenize with masks, drop/truncate what does not
fit (counted), split off the evaluation set, and cache the result under a content fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dolphin_train.config.schema import FALLBACK_PREFIX, Config
from dolphin_train.data.canonical import load_canonical
from dolphin_train.data.encode import KEPT, NO_TRAINABLE, REJECTED, TOO_LONG, TRUNCATED, ConversationEncoder
from dolphin_train.data.fast_bpe import FastBPE
from dolphin_train.data.formats import RowProblem
from dolphin_train.data.named_templates import NAMED_TEMPLATES, end_tokens_for
from dolphin_train.data.report import PreparationReport
from dolphin_train.data.sources import Source, guessed_rows, resolve_source, sources_fingerprint
from dolphin_train.data.templates import CHATML_TEMPLATE, ChatMLTemplate, Template, TokenizerTemplate
from dolphin_train.errors import DataError
from dolphin_train.process_group import on_main_process_first, process_alive
from dolphin_train.terminal import bars_wanted, datasets_bars, verbose

log = logging.getLogger(__name__)

# Bump when the prepared format or the masking rule changes, so old caches are not reused.
PREPARED_FORMAT_VERSION = 3  # 2: Jinja chat templates write BOS themselves; 3: special-token text in contents
MAX_LISTED_PROBLEMS = 20
SAMPLE_FOR_FAST_CHECK = 100  # a guard only: the engine is exact by construction


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length
    eval: Any | None
    report: PreparationReport
    path: Path


_SERIALIZED: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def serialized_tokenizer(tokenizer: Any) -> str:
    """The Rust tokenizer's JSON (half a second for Llama-3), made once per tokenizer and size: the cache
    fingerprint and the fast engine both read it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("a fast (Rust) tokenizer is required: the masking uses its character offsets")
    size, text = _SERIALIZED.get(tokenizer, (-1, ""))
    if size != len(tokenizer):
        text = backend.to_str()
        _SERIALIZED[tokenizer] = (len(tokenizer), text)
    return text


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything in the tokenizer that changes ids: vocabulary, merges, added tokens, template."""
    return hashlib.sha256((serialized_tokenizer(tokenizer) + str(tokenizer.chat_template)).encode()).hexdigest()


def data_fingerprint(cfg: Config, tokenizer: Any, sources: list[Source]) -> str:
    """Keyed by the data files' contents (not their paths), the tokenizer, and every key that changes
    tokens, labels or the split: editing a file, a token or `sequence_len` prepares afresh."""
    token_keys = {
        "version": PREPARED_FORMAT_VERSION,
        "datasets": [d.model_dump(exclude={"path"}) for d in cfg.datasets],
        "chat_template": cfg.template_name,
        "eot_tokens": cfg.eot_tokens,
        "default_system_message": cfg.default_system_message,
        "skip_invalid_rows": cfg.skip_invalid_rows,
        "shuffle_merged_datasets": cfg.shuffle_merged_datasets,
        "sequence_len": cfg.sequence_len,
        "excess_length_strategy": cfg.excess_length_strategy,
        "train_on_inputs": cfg.train_on_inputs,
        "special_tokens_in_content": cfg.special_tokens_in_content,
        "val_set_size": cfg.val_set_size,
        "seed": cfg.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": sources_fingerprint(sources),
        **({"dataset_exact_deduplication": True} if cfg.dataset_exact_deduplication else {}),
        **({"curriculum_sampling": True} if cfg.curriculum_sampling else {}),  # the rows' order
    }
    return hashlib.sha256(json.dumps(token_keys, sort_keys=True).encode()).hexdigest()[:16]


def _approximate_rows(sources: list[Source]) -> int:
    """Enough to choose the number of worker processes."""
    return guessed_rows(sum(p.stat().st_size for s in sources for p in s.files))


def _num_proc(cfg: Config, rows: int) -> int | None:
    """Worker processes for tokenization; None runs in this process (`datasets` starts a pool even for 1)."""
    n = cfg.dataset_num_proc or (1 if rows < 5000 else min(8, os.cpu_count() or 1))
    # Workers cost a second or two to start: only worth it for larger datasets.
    return None if n == 1 else n


def _raise_on_problems(problems: list[str]) -> None:
    if not problems:
        return
    listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(f"{len(problems)} malformed row(s); nothing was tokenized:\n{listed}{more}")


ENGINE_HF = "Hugging Face tokenizers"
ENGINE_FAST = "tiktoken BPE (exact by construction)"


def _checked_fast_tokenizer(encoder: ConversationEncoder, tokenizer: Any, canonical: Any) -> FastBPE | None:
    """The tiktoken engine where it is exact for this tokenizer (fast_bpe.py says why), checked again on a
    sample of this data as a guard: a disagreement there is a bug, said loudly, never a quiet fallback."""
    fast = FastBPE.from_tokenizer(tokenizer, serialized_tokenizer(tokenizer))
    if fast is None:
        log.info("Tokenizing with the Hugging Face tokenizer")
        return None
    sample = canonical.select(range(min(len(canonical), SAMPLE_FOR_FAST_CHECK)))
    texts = []
    for row in sample:
        try:
            texts.append(encoder.render(row).text)
        except RowProblem:  # reported with the others after tokenization
            continue
    if not texts:
        return None
    differs = fast.first_disagreement(tokenizer, texts)
    if differs is not None:
        log.error(
            "BUG: the fast BPE engine, exact by construction, gives other ids than the Hugging Face tokenizer on "
            "%r; using the Hugging Face tokenizer for this preparation. Please report it with this text.",
            differs[:200],
        )
        return None
    log.info(
        "Tokenizing with tiktoken's BPE (exact by construction; %d unreachable vocabulary tokens left out; "
        "checked on %d sample rows)", fast.left_out, len(texts),
    )  # fmt: skip
    return fast


def template_for(cfg: Config, tokenizer: Any) -> Template:
    """ChatML, or the Jinja template `load_tokenizer` left on the tokenizer (a named one, or its own)."""
    name = cfg.template_name.removeprefix(FALLBACK_PREFIX)
    if cfg.template_name == "chatml" or (name == "chatml" and tokenizer.chat_template in (None, CHATML_TEMPLATE)):
        return ChatMLTemplate()
    if not getattr(tokenizer, "chat_template", None):
        because = "" if cfg.chat_template else " (the default for `type: chat_template` rows, as in axolotl)"
        raise DataError(
            f"chat_template: {cfg.template_name}{because}, but the tokenizer has no chat template: set "
            "chat_template to chatml or to a model family's format (e.g. llama3)"
        )
    named = NAMED_TEMPLATES.get(name)
    uses_named = named is not None and tokenizer.chat_template == named.jinja
    end_tokens = cfg.eot_tokens or (end_tokens_for(name, tokenizer.eos_token) if uses_named else None)
    for token in end_tokens or []:
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
            what = "eot_tokens" if cfg.eot_tokens else f"{name}'s end-of-turn token"
            raise DataError(f"{what}: {token!r} is not a single token of this tokenizer; add it under `tokens:`")
    return TokenizerTemplate(tokenizer, end_tokens, named.markers if uses_named else ())


def _tokenize(cfg: Config, tokenizer: Any, sources: list[Source], work_dir: Path) -> tuple[Any, PreparationReport]:
    report = PreparationReport(sequence_len=cfg.sequence_len, special_tokens_kept=cfg.special_tokens_in_content)
    num_proc = _num_proc(cfg, _approximate_rows(sources))
    started = time.perf_counter()
    loaded = load_canonical(cfg, sources, work_dir, num_proc)
    log.debug("Read and checked %d rows in %.1f s", sum(loaded.rows_read.values()), time.perf_counter() - started)
    report.rows_read = loaded.rows_read
    report.blank_lines, report.empty_files, report.skipped_files = (
        loaded.blank_lines,
        loaded.empty_files,
        loaded.skipped_files,
    )
    for path, n in loaded.blank_lines.items():
        log.info("%s: %d blank line%s (no row; counted)", path, n, "s" if n != 1 else "")
    for path in loaded.empty_files:
        log.warning("%s is empty: no rows from it", path)
    for path in loaded.skipped_files:
        log.warning("%s is not a data file (.jsonl, .json, .parquet, .csv, .arrow): not read", path)
    if cfg.skip_invalid_rows:
        for _, reason, _ in loaded.problems:
            report.skipped_invalid[reason] = report.skipped_invalid.get(reason, 0) + 1
    else:
        _raise_on_problems([f"{where}: {detail}" for where, _, detail in loaded.problems])
    canonical = loaded.dataset
    if canonical is None or len(canonical) == 0:
        empty = f" ({', '.join(loaded.empty_files)} empty)" if loaded.empty_files else ""
        raise DataError(f"the datasets hold no usable rows{empty}")
    if cfg.shuffle_merged_datasets and len(cfg.datasets) > 1 and not cfg.curriculum_sampling:
        canonical = canonical.shuffle(seed=cfg.seed)
    encoder = ConversationEncoder(
        tokenizer,
        cfg.sequence_len,
        cfg.train_on_inputs,
        truncate=cfg.excess_length_strategy == "truncate",
        template=template_for(cfg, tokenizer),
        special_tokens_in_content=cfg.special_tokens_in_content,
    )
    started = time.perf_counter()
    encoder.fast = _checked_fast_tokenizer(encoder, tokenizer, canonical)
    report.engine = ENGINE_FAST if encoder.fast is not None else ENGINE_HF
    log.debug("Chose the tokenizer engine in %.1f s", time.perf_counter() - started)
    started = time.perf_counter()
    if encoder.fast is not None and num_proc:
        encoder.fast.threads = 1  # each worker process is one thread of tokenization
    with datasets_bars(bars_wanted() or verbose()):
        tokenized = canonical.map(
            encoder,
            batched=True,
            batch_size=1000,
            num_proc=num_proc,
            remove_columns=canonical.column_names,
            desc="Tokenizing",
            # Our cache is keyed by content; skip `datasets`' own fingerprint (it would hash the encoder).
            new_fingerprint="tokenized",
        )
    log.debug("Tokenized %d rows in %.1f s", len(tokenized), time.perf_counter() - started)
    status = column(tokenized, "status")
    _template_rejections(cfg, canonical, tokenized, status, report)
    counts = np.bincount(status, minlength=5)
    report.kept = int(counts[KEPT] + counts[TRUNCATED])
    report.truncated = int(counts[TRUNCATED])
    report.dropped_too_long = int(counts[TOO_LONG])
    report.dropped_no_trainable = int(counts[NO_TRAINABLE])
    report.special_tokens_in_content = int(column(tokenized, "special_text").sum())
    keep = np.flatnonzero((status == KEPT) | (status == TRUNCATED))
    kept = tokenized.select(keep).remove_columns(["status", "problem", "special_text"])
    if cfg.dataset_exact_deduplication:
        kept = _without_duplicates(kept, report)
    if len(kept) == 0:
        raise DataError(
            f"no row is left to train on: {report.dropped_too_long} longer than sequence_len "
            f"({cfg.sequence_len}), {report.dropped_no_trainable} with no trainable token"
        )
    lengths = column(kept, "length")
    report.tokens = int(lengths.sum())
    report.trainable_tokens = int(column(kept, "trainable").sum())
    report.longest = int(lengths.max())
    return kept, report


def _without_duplicates(rows: Any, report: PreparationReport) -> Any:
    """The first of each set of rows with the same tokens and labels (`dataset_exact_deduplication`)."""
    seen: set[bytes] = set()
    first = []
    for start, batch in enumerate(rows.select_columns(["input_ids", "labels"]).iter(batch_size=10_000)):
        for offset, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
            digest = hashlib.blake2b(np.asarray(ids, np.int64).tobytes(), digest_size=16)
            digest.update(np.asarray(labels, np.int64).tobytes())
            if digest.digest() not in seen:
                seen.add(digest.digest())
                first.append(start * 10_000 + offset)
    report.dropped_duplicates = len(rows) - len(first)
    report.kept -= report.dropped_duplicates
    return rows.select(first) if report.dropped_duplicates else rows


def column(dataset: Any, name: str) -> np.ndarray:
    """One column as a NumPy array, straight from Arrow (`dataset[name]` makes a Python object per row)."""
    return dataset.with_format("arrow")[name].to_numpy()


def _template_rejections(cfg: Config, canonical: Any, tokenized: Any, status: Any, report: PreparationReport) -> None:
    """Rows the chat template cannot format (a system turn for Gemma, turns that do not alternate for
    Mistral...): an error naming them, or with `skip_invalid_rows`, dropped and counted."""
    rejected = np.flatnonzero(status == REJECTED)
    if not len(rejected):
        return
    if cfg.skip_invalid_rows:
        reason = "rejected by the chat template"
        report.skipped_invalid[reason] = report.skipped_invalid.get(reason, 0) + len(rejected)
        return
    shown = rejected[:MAX_LISTED_PROBLEMS]
    where, problem = canonical.select(shown)["where"], tokenized.select(shown)["problem"]
    listed = "\n".join(f"  - {w}: {p}" for w, p in zip(where, problem, strict=True))
    more = f"\n  ... and {len(rejected) - len(shown)} more" if len(rejected) > len(shown) else ""
    raise DataError(
        f"{len(rejected)} row(s) the chat template ({cfg.template_name}) cannot format (skip_invalid_rows: true "
        f"drops them, counted):\n{listed}{more}"
    )


def _split(cfg: Config, dataset: Any) -> tuple[Any, Any | None]:
    if not cfg.val_set_size:
        return dataset, None
    size = cfg.val_set_size if cfg.val_set_size < 1 else int(cfg.val_set_size)
    # As `train_test_split` counts them: a fraction's evaluation rows round up.
    eval_rows = size if size >= 1 else math.ceil(size * len(dataset))
    if eval_rows >= len(dataset) or (size < 1 and size * len(dataset) < 1):
        raise DataError(
            f"val_set_size: {cfg.val_set_size} leaves no rows for training or evaluation ({len(dataset)} rows "
            "kept): lower it, or set 0 for no evaluation set"
        )
    # Curriculum learning keeps the order: the evaluation rows are then the last ones.
    split = dataset.train_test_split(test_size=size, seed=cfg.seed, shuffle=not cfg.curriculum_sampling)
    return split["train"], split["test"]


def prepared_entry(cfg: Config, fingerprint: str) -> Path:
    """Where this config's prepared data lives (complete once it holds report.json)."""
    return Path(cfg.dataset_prepared_path) / fingerprint


def load_prepared(path: Path) -> PreparedData:
    import datasets

    report = PreparationReport.from_json((path / "report.json").read_text())
    report.from_cache = True
    train = datasets.load_from_disk(str(path / "train"))
    eval_set = datasets.load_from_disk(str(path / "eval")) if (path / "eval").exists() else None
    if len(train) != report.train_rows or (len(eval_set) if eval_set is not None else 0) != report.eval_rows:
        raise ValueError("the row counts differ from the report's")
    return PreparedData(train, eval_set, report, path)


def _load_complete(path: Path) -> PreparedData | None:
    """The cache entry at `path`, or None when there is none or it is incomplete or damaged (a part deleted,
    an Arrow file truncated): that entry is removed, to be prepared again."""
    if not path.exists():
        return None
    try:
        return load_prepared(path)
    except Exception as exc:  # json, pyarrow and `datasets` each have their own ways of failing here
        log.warning("Prepared data in %s is incomplete or damaged (%s): preparing it again", path, _short(exc))
        shutil.rmtree(path, ignore_errors=True)
        return None


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__


_WORK_PREFIX = "."  # temporary directories: .<fingerprint>-<host>-<pid>-<random>


def _remove_abandoned_work(root: Path) -> None:
    """Temporary directories left by preparations that were killed on this machine (their process is gone)."""
    host = socket.gethostname()
    for work in root.glob(f"{_WORK_PREFIX}*-{host}-*-*"):
        pid = work.name.removeprefix(_WORK_PREFIX).split(f"-{host}-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            log.info("Removing %s, left by a preparation that was stopped", work)
            shutil.rmtree(work, ignore_errors=True)


def prepare_data(cfg: Config, tokenizer: Any) -> PreparedData:
    """Prepared data for this config: from the cache when the fingerprint matches, else built and cached.

    The cache entry is written to a temporary directory and renamed into place, so an interrupted run
    never leaves a half-written entry that a later run would trust. `datasets`' own progress bars (splits
    generated, datasets saved) stay hidden unless -v; ours (reading, tokenizing) show on a terminal.
    """
    with datasets_bars(verbose()):
        return _prepare_data(cfg, tokenizer)


def _prepare_data(cfg: Config, tokenizer: Any) -> PreparedData:
    # The cache and the output directory are never data, even inside a dataset directory.
    sources = [resolve_source(ds, exclude=(cfg.dataset_prepared_path, cfg.output_dir)) for ds in cfg.datasets]
    fingerprint = data_fingerprint(cfg, tokenizer, sources)
    final = prepared_entry(cfg, fingerprint)
    root = final.parent
    cached = _load_complete(final)
    if cached is not None:
        log.info("Reusing prepared data from %s", final)
        return cached
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work(root)
    prefix = f"{_WORK_PREFIX}{fingerprint}-{socket.gethostname()}-{os.getpid()}-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
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
        if _load_complete(final) is not None:  # another process won the race with the same content
            shutil.rmtree(out)
        else:
            out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("Prepared data saved to %s", final)
    prepared = load_prepared(final)
    prepared.report.from_cache = False
    return prepared


def prepare_on_main_process_first(cfg: Config, tokenizer: Any, device: str) -> PreparedData:
    """Under several processes, rank 0 prepares and caches while the others wait, then they load the same
    cache entry; a single process simply prepares."""
    return on_main_process_first(lambda: prepare_data(cfg, tokenizer), device)
