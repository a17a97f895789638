"""Throughput figures added to the training logs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from dolphin_train.train.throughput import ThroughputMeter, flops_per_token, peak_flops


def test_flops_per_token_counts_matrix_parameters_and_attention() -> None:
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    without_input_embedding = total - 100 * 32
    assert flops_per_token(model, 128) == 6 * without_input_embedding + 12 * 2 * 32 * 128
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.model.layers.parameters())
    assert flops_per_token(model, 128) == 6 * (without_input_embedding - frozen) + 4 * frozen + 12 * 2 * 32 * 128


def test_logs_gain_tokens_per_second_and_mfu(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 100.0, 102.0])  # construction, train begin, first log
    monkeypatch.setattr("dolphin_train.train.throughput.time.perf_counter", lambda: next(clock))
    meter = ThroughputMeter(flops_per_token=1e9, peak=1e12, world_size=2)
    state = SimpleNamespace(num_input_tokens_seen=0)
    meter.on_train_begin(None, state, None)
    state.num_input_tokens_seen = 1000
    logs = meter.figures(state)
    assert logs["tokens_per_second"] == 500
    assert logs["mfu"] == pytest.approx(500 * 1e9 / 2e12)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("Some CPU") is None
