"""CUDA attention backends against SDPA on packed rows (bf16). Skipped without a GPU; run by
scripts/gpu_check.sh on a lent GPU machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dolphin_train.config.machine import torch_varlen_available
from dolphin_train.model.attention import register_varlen_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model_and_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    lengths = [300, 17, 700, 5, 1024]
    ids = torch.randint(3, 1000, (1, sum(lengths)), device="cuda")
    pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    return model, {"input_ids": ids, "position_ids": pos}, lengths


def _alone(model, batch, lengths):
    outs, at = [], 0
    for n in lengths:
        outs.append(model(input_ids=batch["input_ids"][:, at : at + n]).logits)
        at += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", ["sdpa", "dolphin_varlen", "flash_attention_2"])
def test_packed_rows_never_attend_across_conversations(backend: str) -> None:
    if backend == "dolphin_varlen" and not torch_varlen_available():
        pytest.skip("torch.nn.attention.varlen is not available")
    if backend == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    if backend == "dolphin_varlen":
        register_varlen_attention()
    model, batch, lengths = _model_and_batch()
    with torch.no_grad():
        reference = _alone(model, batch, lengths)  # each conversation alone, SDPA
        model.set_attn_implementation(backend)
        packed = model(**batch).logits
    torch.testing.assert_close(packed.float(), reference.float(), atol=5e-2, rtol=5e-2)


def test_varlen_backend_under_autocast_with_float32_weights() -> None:
    """Full fine-tuning keeps float32 master weights and autocasts: the varlen kernel still gets 16-bit."""
    if not torch_varlen_available():
        pytest.skip("torch.nn.attention.varlen is not available")
    register_varlen_attention()
    model, batch, lengths = _model_and_batch()
    model = model.float()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = _alone(model, batch, lengths)
        model.set_attn_implementation("dolphin_varlen")
        packed = model(**batch).logits
    torch.testing.assert_close(packed.float(), reference.float(), atol=5e-2, rtol=5e-2)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_loss() -> None:
    """The chunked-loss head on CUDA with float32 weights under bf16 autocast (full fine-tuning): same loss
    and head gradient as the model's own loss, within a tolerance that labels off by one position break
    (the same check runs on the CPU in test_loss.py)."""
    from test_loss import LOSS_TOLERANCE, chunked_against_plain

    plain, chunked, unshifted, grad_error = chunked_against_plain("cuda")
    assert abs(chunked - plain) < LOSS_TOLERANCE < abs(unshifted - plain)
    assert grad_error < 1e-2
