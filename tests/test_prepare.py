"""Data preparation: bad rows are reported with file and line, nothing is dropped silently, the split is
seeded, and the cache is keyed by the data's contents."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import sharegpt, tiny_config, write_config, write_jsonl
from dolphin_train.cli import main
from dolphin_train.config.load import validate_mapping
from dolphin_train.data.prepare import prepare_data
from dolphin_train.errors import DataError
from dolphin_train.model.tokenizer import load_tokenizer

GOOD = sharegpt(("human", "What is 2+2?"), ("gpt", "4."))


def _prepare(tmp_path: Path, rows: list, **overrides):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = validate_mapping(tiny_config(tmp_path, data, **overrides))
    return prepare_data(cfg, load_tokenizer(cfg).tokenizer)


def test_malformed_rows_are_listed_with_file_and_line_before_tokenizing(tmp_path: Path) -> None:
    rows = [
        GOOD,
        '{"conversations": [',  # line 2: broken JSON
        {"conversation": []},  # line 3: wrong field
        sharegpt(("human", "hi"), ("robot", "beep")),  # line 4: unknown role
        sharegpt(("human", "hi"), ("gpt", "")),  # line 5: empty content
        sharegpt(("human", "only a question")),  # line 6: no assistant turn
        {"messages": [{"role": "user", "content": 3}]},  # line 7: wrong field for sharegpt
    ]
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, rows)
    text = str(info.value)
    data = tmp_path / "data.jsonl"
    assert text.startswith("6 malformed row(s); nothing was tokenized")
    assert f"{data}:2: invalid JSON" in text
    assert f"{data}:3: missing field 'conversations'" in text
    assert f"{data}:4: turn 1: unknown role 'robot'" in text
    assert f"{data}:5: empty turn 1: 'value'" in text
    assert f"{data}:6: no assistant turn" in text
    assert f"{data}:7: missing field 'conversations'" in text


def test_openai_messages_format(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        }
    ] * 3
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    datasets = [{"path": str(data), "type": "chat_template"}]
    cfg = validate_mapping(tiny_config(tmp_path, data, datasets=datasets, chat_template="chatml"))
    prepared = prepare_data(cfg, load_tokenizer(cfg).tokenizer)
    assert prepared.report.kept == 3 and prepared.report.trainable_tokens > 0


def test_too_long_rows_are_dropped_and_counted_or_truncated(tmp_path: Path) -> None:
    long = sharegpt(("human", "Count."), ("gpt", " ".join(str(i) for i in range(400))))
    prepared = _prepare(tmp_path / "drop", [GOOD, long, GOOD], sequence_len=64)
    assert (prepared.report.kept, prepared.report.dropped_too_long, prepared.report.truncated) == (2, 1, 0)
    assert len(prepared.train) == 2
    prepared = _prepare(tmp_path / "cut", [GOOD, long, GOOD], sequence_len=64, excess_length_strategy="truncate")
    assert (prepared.report.kept, prepared.report.dropped_too_long, prepared.report.truncated) == (3, 0, 1)
    assert max(prepared.train["length"]) == 64


def test_val_set_size_as_fraction_or_count_is_seeded(tmp_path: Path) -> None:
    rows = [sharegpt(("human", f"What is {i}+1?"), ("gpt", f"{i + 1}.")) for i in range(50)]
    a = _prepare(tmp_path / "a", rows, val_set_size=0.2)
    b = _prepare(tmp_path / "b", rows, val_set_size=0.2)
    assert (a.report.train_rows, a.report.eval_rows) == (40, 10)
    assert a.eval["input_ids"] == b.eval["input_ids"]
    c = _prepare(tmp_path / "c", rows, val_set_size=7)
    assert (c.report.train_rows, c.report.eval_rows) == (43, 7)


def test_cache_is_reused_and_invalidated_by_editing_the_data(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 5)
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, data))
    assert main(["preprocess", str(path)]) == 0
    first = capsys.readouterr().out
    assert "reused from cache" not in first
    assert main(["preprocess", str(path)]) == 0
    assert "reused from cache" in capsys.readouterr().out
    write_jsonl(data, [GOOD] * 6)  # same path, new contents
    assert main(["preprocess", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reused from cache" not in out and "6" in out
    assert len(list((tmp_path / "prepared").iterdir())) == 2


def test_preprocess_reports_a_broken_file_without_traceback(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, "not json"])
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, data))
    assert main(["preprocess", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{data}:2: invalid JSON" in err and "Traceback" not in err


def test_missing_dataset_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, tmp_path / "nope.jsonl"))
    assert main(["preprocess", str(path)]) == 1
    assert "dataset not found" in capsys.readouterr().err


def test_inspect_shows_trained_tokens_and_statistics(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 4)
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, data, sequence_len=64))
    assert main(["inspect", str(path), "--n", "1", "--ids"]) == 0
    out = capsys.readouterr().out
    assert "example 0" in out and "<|im_start|>" in out and "4(" in out  # the answer "4." with its token id
    assert "length p50 / p90 / p99 / max" in out and "packing at 64 tokens" in out


def test_missing_file_with_a_hub_like_path_is_still_a_missing_file(tmp_path: Path) -> None:
    from dolphin_train.config.schema import DatasetConfig
    from dolphin_train.data.sources import resolve_source

    assert resolve_source(DatasetConfig(path="cognitivecomputations/dolphin")).hub
    with pytest.raises(DataError, match=r"dataset not found: data/chat\.jsonl"):
        resolve_source(DatasetConfig(path="data/chat.jsonl"))
