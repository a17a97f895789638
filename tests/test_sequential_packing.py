"""`sample_packing_sequentially` (next-fit packing in dataset order) and `curriculum_sampling` (rows in
dataset order, nothing shuffled): order kept, every token packed exactly once, a packed row still the same
loss as its conversations alone, and the counts the plan and `inspect` report."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import sharegpt, tiny_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.resolve import resolve_runtime
from dolphin_train.data.packing import PackedRows, PackingOrder, build_training_rows, next_fit, pack_conversations
from dolphin_train.data.prepare import prepare_data
from dolphin_train.errors import ConfigError
from dolphin_train.model.tokenizer import load_tokenizer
from dolphin_train.train.arguments import build_training_arguments
from dolphin_train.train.collator import ChatCollator
from dolphin_train.train.schedule import compute_schedule
from test_packing import _conversations, _ListDataset, _summed_loss, _tiny_llama


def test_next_fit_keeps_the_order_and_packs_every_item_once() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, 2000)
    bins = next_fit(lengths, 512)
    assert [i for b in bins for i in b] == list(range(len(lengths)))  # in order, each once
    assert all(sum(int(lengths[i]) for i in b) <= 512 for b in bins)
    # Next fit: a row closes only when the next conversation does not fit in it.
    assert all(sum(int(lengths[i]) for i in a) + int(lengths[b[0]]) > 512 for a, b in itertools.pairwise(bins))
    assert len(bins) >= len(pack_conversations(lengths, 512, seed=0).bins)  # best fit packs tighter
    with pytest.raises(ValueError, match="exceeds"):
        next_fit(np.array([3, 600]), 512)


def test_by_hand_next_fit() -> None:
    assert next_fit(np.array([300, 200, 100, 400, 112, 512, 1]), 512) == [[0, 1], [2, 3], [4], [5], [6]]


def test_pack_order_shuffles_rows_unless_curriculum() -> None:
    lengths = np.arange(1, 200)
    shuffled = pack_conversations(lengths, 256, seed=3, order=PackingOrder(sequential=True))
    in_order = pack_conversations(lengths, 256, seed=3, order=PackingOrder(sequential=True, in_order=True))
    assert in_order.bins == next_fit(lengths, 256)
    assert shuffled.bins != in_order.bins and sorted(shuffled.bins) == sorted(in_order.bins)
    assert in_order.total_tokens == int(lengths.sum())


def test_sequentially_packed_row_equals_its_conversations_alone() -> None:
    """The next-fit rows are ordinary packed rows: each conversation's logits and the row's loss are those
    of the conversations run one by one."""
    model = _tiny_llama()
    convs = _conversations(np.random.default_rng(4), [7, 19, 5, 12, 30, 9])
    lengths = np.array([c["length"] for c in convs])
    layout = pack_conversations(lengths, 40, seed=0, order=PackingOrder(sequential=True, in_order=True))
    assert layout.bins == [[0, 1, 2], [3], [4, 5]]
    rows = PackedRows(_ListDataset(convs), layout)
    for b, members in enumerate(layout.bins):
        batch = ChatCollator(pad_token_id=0, pad_to=40)([rows[b]])
        with torch.no_grad():
            out = model(**batch)
        loss, items, start = 0.0, 0, 0
        for m in members:
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([convs[m]["input_ids"]])).logits
            n = convs[m]["length"]
            torch.testing.assert_close(out.logits[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
            summed, count = _summed_loss(alone, torch.tensor([convs[m]["labels"]]))
            loss, items, start = loss + float(summed), items + count, start + n
        assert float(out.loss) == pytest.approx(loss / items, rel=1e-5)


def _numbered_data(tmp_path: Path, name: str, first: int, count: int) -> Path:
    rows = [sharegpt(("human", f"question {i} " + "word " * (i % 7)), ("gpt", f"answer {i}"))
            for i in range(first, first + count)]  # fmt: skip
    return write_jsonl(tmp_path / name, rows)


def _numbers_in_order(tokenizer: Any, dataset: Any) -> list[int]:
    return [int(tokenizer.decode(ids).split("question ")[1].split()[0]) for ids in dataset["input_ids"]]


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    tmp = tmp_path_factory.mktemp("curriculum")
    raw = tiny_config(tmp, sequence_len=128, sample_packing=True, sample_packing_sequentially=True,
                      curriculum_sampling=True, val_set_size=0.1)  # fmt: skip
    raw["datasets"] = [{"path": str(_numbered_data(tmp, "a.jsonl", 0, 30)), "type": "sharegpt"},
                       {"path": str(_numbered_data(tmp, "b.jsonl", 30, 30)), "type": "sharegpt"}]  # fmt: skip
    cfg = validate_mapping(raw)
    tok = load_tokenizer(cfg)
    return cfg, tok, prepare_data(cfg, tok.tokenizer)


def test_curriculum_keeps_the_files_order_through_mixing_split_and_packing(curriculum: tuple[Any, Any, Any]) -> None:
    cfg, tok, prepared = curriculum
    numbers = _numbers_in_order(tok.tokenizer, prepared.train)
    assert numbers == list(range(54))  # not shuffled when mixed; the held-out rows are the last 6
    assert _numbers_in_order(tok.tokenizer, prepared.eval) == list(range(54, 60))
    rows = build_training_rows(cfg, prepared)
    bins = rows.train_layout.bins
    assert [i for b in bins for i in b] == list(range(54))  # every conversation once, in order
    assert bins == next_fit(np.asarray(prepared.train["length"]), cfg.sequence_len)
    packed_tokens = sum(len(rows.train[i]["input_ids"]) for i in range(len(rows.train)))
    assert packed_tokens == sum(prepared.train["length"]) == rows.train_layout.total_tokens
    # The Trainer reads the rows in order too: its batches are the packed rows, first to last.
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.train.trainer import DolphinTrainer

    args = build_training_arguments(cfg, resolve_runtime(cfg), compute_schedule(cfg, len(rows.train), 1, False))
    assert args.train_sampling_strategy == "sequential"
    tiny = LlamaConfig(vocab_size=len(tok.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(tiny)
    collator = ChatCollator(tok.tokenizer.pad_token_id)
    trainer = DolphinTrainer(model=model, args=args, train_dataset=rows.train, eval_dataset=rows.eval,
                             data_collator=collator)
    seen = [ids for batch in trainer.get_train_dataloader() for ids in batch["input_ids"].tolist()]
    assert [ids[: len(rows.train[i]["input_ids"])] for i, ids in enumerate(seen)] == [
        rows.train[i]["input_ids"] for i in range(len(rows.train))
    ]


def test_without_curriculum_the_packed_rows_are_shuffled(curriculum: tuple[Any, Any, Any]) -> None:
    cfg, _tok, prepared = curriculum
    shuffled_rows = cfg.model_copy(update={"curriculum_sampling": False})
    layout = build_training_rows(shuffled_rows, prepared).train_layout
    assert sorted(layout.bins) == build_training_rows(cfg, prepared).train_layout.bins
    assert layout.bins != sorted(layout.bins)
    args = build_training_arguments(shuffled_rows, resolve_runtime(cfg), compute_schedule(cfg, 10, 1, False))
    assert args.train_sampling_strategy == "random"


def test_plan_and_inspect_count_the_next_fit_rows(curriculum: tuple[Any, Any, Any]) -> None:
    from dolphin_train.data.inspect import statistics_table

    cfg, _tok, prepared = curriculum
    expected = len(next_fit(np.asarray(prepared.train["length"]), cfg.sequence_len))
    assert len(build_training_rows(cfg, prepared).train) == expected  # what `plan` counts steps from
    table = statistics_table(prepared, cfg.sequence_len, cfg.seed, PackingOrder.from_config(cfg))
    cells = [str(c) for column in table.columns for c in column._cells]
    assert any(f"{expected:,} rows" in c for c in cells) and any("next fit, in order" in c for c in cells)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"sample_packing_sequentially": True}, "no effect without sample_packing"),
        ({"sample_packing": True, "curriculum_sampling": True}, "set sample_packing_sequentially"),
    ],
)
def test_packing_order_keys_refused_where_they_would_do_nothing(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], **keys})
