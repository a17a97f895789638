"""Throughput figures added to the training logs, with FLOPs counted from what each batch really holds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dolphin_train.train.throughput import ModelFlops, ThroughputMeter, conversation_lengths, model_flops, peak_flops

CONFIG = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}  # fmt: skip


def test_model_shape_counts_matrix_parameters_trained_and_frozen() -> None:
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    total = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    flops = model_flops(model)
    assert flops == ModelFlops(trained=total - 100 * 32, frozen=0, layer_params=layer_params, layers=2,
                               attention_width=32)  # the input embedding is a lookup, not a product  # fmt: skip
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    frozen = model_flops(model, checkpointed_layers=2)
    assert (frozen.trained, frozen.frozen, frozen.checkpointed_layers) == (total - 100 * 32 - layer_params,
                                                                           layer_params, 2)  # fmt: skip


def test_a_packed_batch_of_known_lengths_gives_the_hand_computed_flops() -> None:
    """Two rows of 16: conversations of 5 and 9 tokens then 2 of padding; one of 16. Padding forms its own
    segment (positions restart) with no trained label, and is not counted."""
    position_ids = torch.tensor([[*range(5), *range(9), 0, 1], list(range(16))])
    labels = torch.full((2, 16), -100)
    labels[0, 1:5] = 7
    labels[0, 6:14] = 7
    labels[1, 1:] = 7
    tokens, squares = conversation_lengths(position_ids, labels)
    assert (tokens, squares) == (5 + 9 + 16, 25 + 81 + 256)
    flops = ModelFlops(trained=1000, frozen=200, layer_params=900, layers=2, attention_width=32, checkpointed_layers=2)
    model, hardware = flops.of_batch(tokens, squares)
    assert model == (6 * 1000 + 4 * 200) * 30 + 6 * 2 * 32 * 362
    assert hardware == model + 2 * 900 * 30 + 2 * 2 * 32 * 362  # one more forward of every layer
    # Packing short conversations is not charged as one long sequence: 12·L·d·T per token would say far more.
    assert 6 * 2 * 32 * 362 < 12 * 2 * 32 * 16 * 30


def test_logs_gain_tokens_per_second_mfu_and_hfu(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 100.0, 102.0])  # construction, train begin, first log
    monkeypatch.setattr("dolphin_train.train.throughput.time.perf_counter", lambda: next(clock))
    flops = ModelFlops(trained=1000, frozen=0, layer_params=1000, layers=1, attention_width=8, checkpointed_layers=1)
    meter = ThroughputMeter(flops, peak=1e6, world_size=2)
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0)
    meter.on_train_begin(None, state, None)
    batch = {"position_ids": torch.arange(10).view(1, 10), "labels": torch.ones(1, 10, dtype=torch.long)}
    meter.count_batch(batch)
    logs = meter.figures(state)
    model, hardware = flops.of_batch(10, 100)
    assert logs["tokens_per_second"] == 5  # the meter's own count: 10 tokens in 2 s
    assert logs["mfu"] == pytest.approx(model / 2 / 2e6, abs=1e-4) and logs["hfu"] > logs["mfu"]
    assert hardware / 2 / 2e6 == pytest.approx(logs["hfu"], abs=1e-4)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some CPU") is None
