"""Packing: bins are valid and near-optimal, and a packed row is exactly equivalent to its
conversations run one by one (logits and loss), on a tiny Llama with PyTorch SDPA on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.data.packing import PackedRows, best_fit_decreasing, pack_conversations
from dolphin_train.train.collator import ChatCollator


def test_best_fit_decreasing_assigns_every_item_once_within_capacity() -> None:
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.5, 1.0, 5000).astype(int) + 8, 4096)
    bins = best_fit_decreasing(lengths, 4096)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(int(lengths[i]) for i in b) <= 4096 for b in bins)
    lower_bound = -(-int(lengths.sum()) // 4096)
    assert len(bins) <= lower_bound * 1.01


def test_packing_in_progress_chunks_gives_the_same_bins(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 512, 1000)
    whole = best_fit_decreasing(lengths, 512)
    monkeypatch.setattr("dolphin_train.data.packing.PROGRESS_CHUNK", 7)  # many chunk boundaries
    assert best_fit_decreasing(lengths, 512, progress=True) == whole
    assert "Packing" not in capsys.readouterr().err  # done within the bar's one-second delay: no bar


def test_packing_plan_is_seeded_and_reports_efficiency() -> None:
    lengths = np.array([300, 200, 500, 12, 40, 512, 100])
    a, b = pack_conversations(lengths, 512, seed=1), pack_conversations(lengths, 512, seed=1)
    assert a.bins == b.bins
    assert a.total_tokens == int(lengths.sum())
    assert a.efficiency == pytest.approx(lengths.sum() / (len(a.bins) * 512))
    with pytest.raises(ValueError, match="exceeds"):
        pack_conversations(np.array([600]), 512, seed=0)


def _tiny_llama(vocab: int = 97) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
        use_cache=False,  # as in training: transformers detects packed rows only when no KV cache is built
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _conversations(rng: np.random.Generator, lengths: list[int], vocab: int = 97) -> list[dict[str, list[int]]]:
    rows = []
    for n in lengths:
        ids = rng.integers(3, vocab, n).tolist()
        labels = [i if rng.random() < 0.6 else IGNORE_INDEX for i in ids]
        labels[0] = IGNORE_INDEX  # as the encoder does for every conversation
        rows.append({"input_ids": ids, "labels": labels, "length": n})
    return rows


class _ListDataset:
    """The slice of the datasets.Dataset interface that PackedRows reads."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __getitem__(self, idx: list[int]) -> dict[str, list[list[int]]]:
        return {k: [self.rows[i][k] for i in idx] for k in ("input_ids", "labels")}


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="sum"
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("pad_to", [None, 64])
def test_packed_row_equals_conversations_run_alone(pad_to: int | None) -> None:
    model = _tiny_llama()
    rng = np.random.default_rng(1)
    convs = _conversations(rng, [7, 19, 5, 12])
    packed = PackedRows(_ListDataset(convs), layout=type("P", (), {"bins": [[0, 1, 2, 3]]})())
    batch = ChatCollator(pad_token_id=0, pad_to=pad_to)([packed[0]])
    with torch.no_grad():
        out = model(**batch)
    total_loss, total_items, start = 0.0, 0, 0
    for conv in convs:
        ids = torch.tensor([conv["input_ids"]])
        with torch.no_grad():
            alone = model(input_ids=ids).logits
        n = len(conv["input_ids"])
        torch.testing.assert_close(out.logits[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        loss_sum, items = _summed_loss(alone, torch.tensor([conv["labels"]]))
        total_loss += float(loss_sum)
        total_items += items
        start += n
    # The packed loss is the mean over every trainable token of the row: the same number as running the
    # conversations separately and averaging over all their trainable tokens together.
    assert float(out.loss) == pytest.approx(total_loss / total_items, rel=1e-5, abs=1e-6)


def test_two_packed_rows_with_padding_in_one_batch() -> None:
    model = _tiny_llama()
    rng = np.random.default_rng(2)
    convs = _conversations(rng, [9, 4, 15, 6, 3])
    packed = PackedRows(_ListDataset(convs), layout=type("P", (), {"bins": [[0, 1], [2, 3, 4]]})())
    batch = ChatCollator(pad_token_id=0)([packed[0], packed[1]])
    assert batch["input_ids"].shape == (2, 24)  # longest row 24 tokens, padded to a multiple of 8
    with torch.no_grad():
        logits = model(**batch).logits
    for row, members in enumerate([[0, 1], [2, 3, 4]]):
        start = 0
        for m in members:
            ids = torch.tensor([convs[m]["input_ids"]])
            with torch.no_grad():
                alone = model(input_ids=ids).logits
            n = ids.shape[1]
            torch.testing.assert_close(logits[row : row + 1, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_evaluation_rows_are_padded_with_empty_rows_to_even_shards() -> None:
    from dolphin_train.data.packing import PaddedToEvenShards

    rows = [{"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}] * 5
    padded = PaddedToEvenShards(rows, multiple=4, pad_token_id=0)
    assert len(padded) == 8 and padded[4] == rows[4]
    assert all(set(padded[i]["labels"]) == {IGNORE_INDEX} for i in range(5, 8))
    with pytest.raises(IndexError):
        padded[8]
    assert len(PaddedToEvenShards(rows[:4], multiple=4, pad_token_id=0)) == 4
