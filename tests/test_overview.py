"""The run overview printed before training: data sizes, batch in rows and tokens, schedule, hardware."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from conftest import tiny_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.recipe import set_up_run
from dolphin_train.train.overview import run_overview


def test_overview_lists_data_sizes_and_batch_tokens_without_packing(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, val_set_size=40, micro_batch_size=2, gradient_accumulation_steps=2)
    cfg = validate_mapping(raw)
    run = set_up_run(cfg)
    console = Console(width=200, file=io.StringIO())
    console.print(run_overview(cfg, run.runtime, run.schedule, run.rows, run.trainer.model, prepared=run.prepared))
    text = console.file.getvalue()
    # data/tiny_chat.jsonl: 400 rows, 8 longer than 512 tokens dropped, 40 held out.
    report = run.prepared.report
    train_tokens = sum(run.prepared.train["length"])
    assert 0 < train_tokens < report.tokens  # the training split's own tokens, not the eval rows'
    train_trained = sum(run.prepared.train["trainable"])
    assert f"352 conversations, {train_tokens:,} tokens ({train_trained:,} trained)" in text
    assert "eval data" in text and "40 conversations" in text
    assert "off: 352 rows, padded per batch" in text
    assert "4 rows x 512 = up to 2,048 tokens" in text  # micro batch 2 x accumulation 2


def test_overview_without_eval_data_says_none(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, sample_packing=True, pad_to_sequence_len=True, micro_batch_size=4)
    cfg = validate_mapping(raw)
    run = set_up_run(cfg)
    console = Console(width=200, file=io.StringIO())
    console.print(run_overview(cfg, run.runtime, run.schedule, run.rows, run.trainer.model, prepared=run.prepared))
    text = console.file.getvalue()
    assert "392 conversations" in text
    assert "eval data" in text and "none" in text
    assert "4 rows x 512 = 2,048 tokens" in text  # padded to sequence_len: exact, not a bound
