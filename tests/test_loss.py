"""Chunked cross-entropy equals the model's own loss and gradients, and trains the same through the Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO
from dolphin_train.train.loss import install_chunked_head, restore_head
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
    logits = model(input_ids=ids).logits
    head = install_chunked_head(model)
    head.chunk_tokens = 7
    torch.testing.assert_close(model(input_ids=ids).logits, logits)  # without targets: logits as before
    with head.targets(labels, torch.tensor(70)):
        loss = model(input_ids=ids).logits  # the head returns the loss in place of the logits
    assert loss.dim() == 0
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


def test_chunked_loss_with_lora_and_a_head_trained_in_full() -> None:
    """With added tokens the head is peft's wrapper around a trained copy: the chunked loss trains that
    copy and the adapter exactly as the plain loss does, and the saved keys do not change."""
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    model = get_peft_model(LlamaForCausalLM(config), lora)
    for module in model.modules():  # LoRA B starts at zero; give it values so its gradients are generic
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    keys = set(model.state_dict())
    ids = torch.randint(0, 1000, (2, 40))
    labels = ids.clone()
    labels[0, :10] = -100
    plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    head = install_chunked_head(model)
    assert head is not None and set(model.state_dict()) == keys
    head.chunk_tokens = 9
    with head.targets(labels):
        loss = model(input_ids=ids).logits
    loss.backward()
    torch.testing.assert_close(loss, plain, atol=1e-6, rtol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)
    restore_head(model)
    assert model(input_ids=ids).logits.shape == (2, 40, 1000)


def test_chunked_loss_with_lora_and_trained_rows_of_new_tokens() -> None:
    """With added tokens and no `lora_modules_to_save`, peft trains only the new tokens' rows of the input
    embedding and the head: the chunked loss, which puts the trained rows' logits in place of the frozen
    head's, gives the plain loss and gradients, and the saved keys do not change."""
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    rows = [997, 998, 999]
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": rows,
                      "lm_head": rows})  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), lora)
    for name, param in model.named_parameters():  # generic values: the rows differ from the frozen ones
        if "lora_B" in name or "trainable_tokens_delta" in name:
            torch.nn.init.normal_(param)
    keys = set(model.state_dict())
    ids = torch.randint(0, 1000, (2, 40))
    ids[:, ::3] = 998  # the new tokens appear as inputs and as targets
    labels = ids.clone()
    labels[0, :10] = -100
    plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head" in n and "trainable_tokens_delta" in n for n in expected)
    model.zero_grad()
    head = install_chunked_head(model)
    assert head is not None and set(model.state_dict()) == keys
    head.chunk_tokens = 9
    with head.targets(labels):
        loss = model(input_ids=ids).logits
    loss.backward()
    torch.testing.assert_close(loss, plain, atol=1e-6, rtol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)
    restore_head(model)
    assert model(input_ids=ids).logits.shape == (2, 40, 1000) and set(model.state_dict()) == keys


@pytest.mark.parametrize("adapter", [{"adapter": "lora"}, {"adapter": "qlora", "load_in_4bit": True},
                                     {"adapter": "lora", "lora_modules_to_save": ["embed_tokens", "lm_head"]}],
                         ids=["LoRA", "QLoRA", "LoRA, embeddings in full"])  # fmt: skip
def test_trainer_with_chunked_loss_and_an_adapter_gives_the_same_gradients(tmp_path: Path, adapter: dict) -> None:
    settings = {"micro_batch_size": 2, "lora_r": 8, "lora_dropout": 0.0, "train_from_scratch": False, **adapter}
    base = str(_saved_tiny_model(tmp_path))
    plain = _first_step_gradients(tmp_path / "a", base_model=base, chunked_cross_entropy=False, **settings)
    chunked = _first_step_gradients(tmp_path / "b", base_model=base, chunked_cross_entropy=True, **settings)
    trained = "modules_to_save" if "lora_modules_to_save" in adapter else "trainable_tokens_delta"
    assert any("lm_head" in name and trained in name for name in plain)  # the new tokens' rows of the head train
    _assert_same_gradients(plain, chunked)


def _saved_tiny_model(tmp_path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model")).save_pretrained(path)
    return path


def test_the_trainer_loss_hook_refuses_logits_from_a_head_without_labels() -> None:
    from types import SimpleNamespace

    from dolphin_train.train.loss import loss_from_head

    assert loss_from_head(SimpleNamespace(logits=torch.tensor(2.5)), torch.zeros(1)) == 2.5
    with pytest.raises(RuntimeError, match="labels were not handed"):
        loss_from_head(SimpleNamespace(logits=torch.zeros(2, 3, 5)), torch.zeros(1))


# The chunked loss may differ from the plain one by bf16 rounding only: labels off by one position move the
# loss of this random model by 0.022 (measured on the CPU, the same with AVX-512 BF16 and with AVX2 kernels,
# whose bf16 matmuls round differently), so the tolerance stays well under that.
LOSS_TOLERANCE = 5e-3


def chunked_against_plain(device: str) -> tuple[float, float, float, float]:
    """(plain loss, chunked loss, chunked loss with unshifted labels, relative error of the head's gradient)
    for a random Llama with a 32k vocabulary, float32 weights under bf16 autocast, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.train.loss import chunked_causal_lm_loss, install_chunked_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, 32000, (2, 512), device=device)
    labels = ids.clone()
    labels[:, :100] = -100
    with torch.autocast(device, dtype=torch.bfloat16):
        plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    head = install_chunked_head(model)
    head.chunk_tokens = 100
    with torch.autocast(device, dtype=torch.bfloat16), head.targets(labels):
        chunked = model(input_ids=ids).logits
    chunked.backward()
    grad_error = float((head.weight.grad - expected).norm() / expected.norm())
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state
        # Labels moved right by one: the shift inside the loss cancels, each position predicts itself.
        unshifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
        wrong = chunked_causal_lm_loss(hidden, head.weight, None, unshifted)
    return float(plain), float(chunked), float(wrong), grad_error


def test_chunked_loss_under_cpu_bf16_autocast_matches_the_plain_loss_and_catches_shifted_labels() -> None:
    plain, chunked, unshifted, grad_error = chunked_against_plain("cpu")
    assert abs(chunked - plain) < LOSS_TOLERANCE < abs(unshifted - plain)
    assert grad_error < 1e-2
