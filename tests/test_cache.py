"""The prepared-data cache: keyed by everything that changes tokens, labels or the split (and nothing else),
and written atomically so that an interrupted preparation is never reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, sharegpt, tiny_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.data.prepare import data_fingerprint, prepare_data
from dolphin_train.data.sources import resolve_source
from dolphin_train.model.tokenizer import load_tokenizer

DATA = REPO / "data/tiny_chat.jsonl"

# Each change alters the tokens, the labels, or which rows are kept or held out: a new cache entry.
TOKEN_CHANGES: dict[str, dict[str, Any]] = {
    "sequence_len": {"sequence_len": 256},
    "excess_length_strategy": {"excess_length_strategy": "truncate"},
    "train_on_inputs": {"train_on_inputs": True},
    "val_set_size": {"val_set_size": 0.1},
    "seed": {"seed": 8},
    "default_system_message": {"default_system_message": "You are Dolphin."},
    "skip_invalid_rows": {"skip_invalid_rows": True},
    "chat_template": {"chat_template": "tokenizer_default"},
    "tokens (the tokenizer)": {"tokens": ["<|im_start|>", "<|im_end|>", "<|tool|>"]},
    "special_tokens (the tokenizer)": {"special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|im_start|>"}},
    "datasets[].type": {"datasets": [{"path": str(DATA), "type": "chat_template", "field_messages": "conversations",
                                      "message_property_mappings": {"role": "from", "content": "value"}}]},
    "datasets[].roles_to_train": {"datasets": [{"path": str(DATA), "roles_to_train": ["assistant", "user"]}]},
    "datasets[].train_on_eos": {"datasets": [{"path": str(DATA), "train_on_eos": "last"}]},
    "datasets[].drop_system_message": {"datasets": [{"path": str(DATA), "drop_system_message": True}]},
    "datasets[].roles": {"datasets": [{"path": str(DATA), "roles": {"user": ["human"], "assistant": ["gpt"]}}]},
}  # fmt: skip
# Each change leaves the prepared rows as they are: the same entry.
OTHER_CHANGES: dict[str, dict[str, Any]] = {
    "learning_rate": {"learning_rate": 3e-4},
    "micro_batch_size": {"micro_batch_size": 8},
    "num_epochs": {"num_epochs": 3},
    "sample_packing": {"sample_packing": True},
    "output_dir": {"output_dir": "elsewhere"},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "the data file's path (same contents)": {"datasets": [{"path": "COPY"}]},
}


def _fingerprint(tmp_path: Path, changes: dict[str, Any]) -> str:
    if changes.get("datasets") == [{"path": "COPY"}]:
        copy = tmp_path / "elsewhere" / DATA.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(DATA.read_bytes())
        changes = {"datasets": [{"path": str(copy)}]}
    cfg = validate_mapping(tiny_config(tmp_path, **changes))
    if cfg.chat_template == "tokenizer_default":
        tokenizer = load_tokenizer(validate_mapping(tiny_config(tmp_path))).tokenizer  # carries a template
    else:
        tokenizer = load_tokenizer(cfg).tokenizer
    return data_fingerprint(cfg, tokenizer, [resolve_source(ds) for ds in cfg.datasets])


@pytest.mark.parametrize("change", list(TOKEN_CHANGES))
def test_every_key_that_changes_tokens_or_rows_changes_the_cache_entry(change: str, tmp_path: Path) -> None:
    assert _fingerprint(tmp_path, TOKEN_CHANGES[change]) != _fingerprint(tmp_path, {})


@pytest.mark.parametrize("change", list(OTHER_CHANGES))
def test_keys_that_do_not_change_the_rows_keep_the_cache_entry(change: str, tmp_path: Path) -> None:
    assert _fingerprint(tmp_path, OTHER_CHANGES[change]) == _fingerprint(tmp_path, {})


def test_editing_the_data_or_changing_the_tokenizer_files_changes_the_entry(tmp_path: Path) -> None:
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", [sharegpt(("human", "Hi"), ("gpt", "Hello."))])
    before = _fingerprint(tmp_path, {"datasets": [{"path": str(data)}]})
    write_jsonl(data, [sharegpt(("human", "Hi"), ("gpt", "Hello!"))])
    assert _fingerprint(tmp_path, {"datasets": [{"path": str(data)}]}) != before
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(REPO / "configs/tiny/tokenizer", tokenizer)
    text = (tokenizer / "tokenizer.json").read_text()
    swapped = text.replace('"Ġthe": 288', '"Ġthe": 351').replace('"Ġto": 351', '"Ġto": 288')  # two ids swap
    assert swapped != text
    (tokenizer / "tokenizer.json").write_text(swapped)
    assert _fingerprint(tmp_path, {"tokenizer_config": str(tokenizer)}) != _fingerprint(tmp_path, {})


def test_an_interrupted_preparation_leaves_no_entry_and_the_next_run_prepares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry is written to a temporary directory and renamed into place only once complete: a failure
    while the evaluation split is written (the training split already on disk) leaves nothing a later run
    would take for a complete entry."""
    import datasets

    cfg = validate_mapping(tiny_config(tmp_path, val_set_size=0.1))
    tokenizer = load_tokenizer(cfg).tokenizer
    real_save = datasets.Dataset.save_to_disk
    saved: list[str] = []

    def save_then_fail_on_the_second(self: Any, path: str, *args: Any, **kwargs: Any) -> None:
        if saved:
            raise KeyboardInterrupt  # as if killed while writing the evaluation split
        saved.append(path)
        real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_fail_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, tokenizer)
    root = Path(cfg.dataset_prepared_path)
    assert saved and list(root.iterdir()) == []  # the half-written entry is gone, nothing was renamed in
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    prepared = prepare_data(cfg, tokenizer)
    assert not prepared.report.from_cache and prepared.eval is not None
    assert [p.name for p in root.iterdir()] == [prepared.report.fingerprint]
