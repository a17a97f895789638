"""The lean forward of trained token rows (model/token_rows.py) against peft's own forward."""

from __future__ import annotations

import pytest
import torch

from dolphin_train.model.token_rows import lean_token_rows_class, use_lean_token_rows


def _model_with_rows(tie: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
    rows = [5, 90, 91] if tie else {"embed_tokens": [5, 90, 91], "lm_head": [90, 91]}
    settings = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=rows, task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM(shape), settings)
    for name, param in model.named_parameters():  # trained rows unlike the frozen ones, as after some steps
        if "trainable_tokens_delta" in name:
            param.data.normal_()
    return model


def _logits_and_row_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    return logits.detach(), grads


@pytest.mark.parametrize("tie", [False, True], ids=["separate head", "tied head"])
def test_lean_rows_give_peft_values_and_row_gradients(tie: bool) -> None:
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    model = _model_with_rows(tie)
    ids = torch.tensor([[1, 5, 90, 7, 91, 91, 0, 5]])
    expected_logits, expected_grads = _logits_and_row_grads(model, ids)
    use_lean_token_rows(model)
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    assert layers and all(type(m) is lean_token_rows_class() for m in layers)
    logits, grads = _logits_and_row_grads(model, ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert expected_grads[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-5)


def test_lean_rows_allocate_nothing_of_the_matrix_size() -> None:
    """peft's forward copies the whole embedding and head, and its backward makes dense gradients of them."""
    from torch.profiler import ProfilerActivity, profile

    model = _model_with_rows(False)
    ids = torch.tensor([[1, 5, 90, 7]])
    matrix_bytes = model.get_input_embeddings().weight.numel() * 4

    def largest_allocation() -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _logits_and_row_grads(model, ids)
        return max(e.cpu_memory_usage for e in prof.events())

    assert largest_allocation() >= matrix_bytes  # peft's forward: a whole copy
    use_lean_token_rows(model)
    assert largest_allocation() < matrix_bytes
