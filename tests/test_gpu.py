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
    and head gradient as the model's own loss, within bf16 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.train.loss import install_chunked_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, 32000, (2, 512), device="cuda")
    labels = ids.clone()
    labels[:, :100] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    head = install_chunked_head(model)
    head.chunk_tokens = 100
    with torch.autocast("cuda", dtype=torch.bfloat16), head.targets(labels):
        chunked = model(input_ids=ids).logits
    chunked.backward()
    torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=2e-2)
    assert (head.weight.grad - expected).norm() < 1e-2 * expected.norm()
