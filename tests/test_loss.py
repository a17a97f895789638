"""Chunked cross-entropy equals the model's own loss and gradients, and trains the same through the Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dolphin_train.train.loss import chunked_causal_lm_loss, install_chunked_head, restore_head
from test_training import _assert_same_gradients, _first_step_gradients


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_loss(tied: bool) -> None:
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 1000, (2, 50))
    labels = ids.clone()
    labels[0, :20] = -100
    labels[1, 45:] = -100
    plain = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(70)).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    head = install_chunked_head(model)
    hidden = model(input_ids=ids).logits
    assert hidden.shape == (2, 50, 32)  # the head now returns hidden states
    loss = chunked_causal_lm_loss(hidden, head.weight, head.bias, labels, torch.tensor(70), chunk_tokens=7)
    loss.backward()
    torch.testing.assert_close(loss, plain, atol=1e-6, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5)
    restore_head(model)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


def test_trainer_with_chunked_loss_gives_the_same_gradients(tmp_path: Path) -> None:
    plain = _first_step_gradients(tmp_path / "a", micro_batch_size=2, gradient_accumulation_steps=2,
                                  chunked_cross_entropy=False)  # fmt: skip
    chunked = _first_step_gradients(tmp_path / "b", micro_batch_size=2, gradient_accumulation_steps=2,
                                    chunked_cross_entropy=True)  # fmt: skip
    _assert_same_gradients(plain, chunked)
