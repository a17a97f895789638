"""CUDA attention backends against SDPA on packed rows (bf16). Skipped without a GPU; run by
scripts/gpu_check.sh on a lent GPU machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dolphin_train.config.machine import torch_varlen_available
from dolphin_train.config.resolve import FA2_VARLEN, VARLEN
from dolphin_train.model.attention import register_backend, register_varlen_attention

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


def _real_backend(name: str) -> str:
    """One of our backends with its real CUDA kernel, registered; skipped where the kernel is missing."""
    if name == VARLEN and not torch_varlen_available():
        pytest.skip("torch.nn.attention.varlen is not available")
    if name == FA2_VARLEN and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    return register_backend(name) if name != "sdpa" else name


@pytest.mark.parametrize("backend", ["sdpa", VARLEN, FA2_VARLEN])
def test_packed_rows_never_attend_across_conversations(backend: str) -> None:
    backend = _real_backend(backend)
    model, batch, lengths = _model_and_batch()
    with torch.no_grad():
        reference = _alone(model, batch, lengths)  # each conversation alone, SDPA
        model.set_attn_implementation(backend)
        packed = model(**batch).logits
    torch.testing.assert_close(packed.float(), reference.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", [VARLEN, FA2_VARLEN])
def test_packed_micro_batch_3_equals_each_conversation_alone_on_the_real_kernels(backend: str) -> None:
    """Issue 22's D1 on the CUDA kernels: three packed rows collated as training collates them (sequence
    boundaries from the collator), each conversation against itself alone under SDPA, bf16."""
    from test_gpu_paths_on_cpu import _packed_batch, _per_conversation

    backend = _real_backend(backend)
    model, _, _ = _model_and_batch()
    lengths = [[300, 17, 180], [700, 5], [1024]]
    batch, alone = _packed_batch(lengths, boundaries=True, vocab=1000)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        reference = [model(input_ids=ids.cuda()).logits[0].float() for ids in alone]
        model.set_attn_implementation(backend)
        packed = model(**batch, use_cache=False).logits.float()
    for got, want in zip(_per_conversation(packed, lengths), reference, strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", [VARLEN, FA2_VARLEN])
def test_generation_with_the_cache_on_the_real_kernels(backend: str) -> None:
    """Issue 22's D2 on the CUDA kernels: greedy generation with the KV cache, three prompts left-padded;
    each step's logits against SDPA run without a cache over the generated sequences (teacher forcing)."""
    backend = _real_backend(backend)
    model, _, _ = _model_and_batch()
    prompts = [[5, 17, 3, 44, 8, 120, 7], [9, 2], [61, 7, 7, 30]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    model.set_attn_implementation(backend)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, width:])], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        model.set_attn_implementation("sdpa")
        reference = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions).logits.float()
    steps = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab)
    torch.testing.assert_close(steps, reference[:, width - 1 : -1], atol=5e-2, rtol=5e-2)


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


def _tiny_llama_on_gpu(hidden: int = 256, layers: int = 2, vocab: int = 1000):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, use_cache=False)  # fmt: skip
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def test_activation_offloading_gives_the_same_gradients() -> None:
    """transformers' offload (checkpointed layer inputs in pinned CPU memory) changes where tensors live,
    not the computation."""
    grads = []
    for offload in (False, True):
        model = _tiny_llama_on_gpu()
        model.train()
        model.activation_checkpointing_enable({"use_reentrant": False}, offload=offload)
        ids = torch.randint(3, 1000, (2, 512), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-3, rtol=1e-2, msg=name)


def test_liger_kernels_keep_packed_rows_exact() -> None:
    """Liger's RMSNorm, RoPE and SwiGLU on packed rows: the same logits as the plain model, and its fused
    linear cross-entropy the same loss as the chunked loss."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    from dolphin_train.train.loss import install_chunked_head, restore_head

    model, batch, _ = _model_and_batch()
    register_varlen_attention()
    model.set_attn_implementation("dolphin_varlen")
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        plain = model(**batch).logits.float()
        head = install_chunked_head(model)
        with head.targets(labels):
            chunked = model(**batch).logits
    restore_head(model)
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, model=model)
    with torch.no_grad():
        fused_kernels = model(**batch).logits.float()
    torch.testing.assert_close(fused_kernels, plain, atol=6e-2, rtol=6e-2)
    apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=True, model=model)
    model.train()
    with torch.no_grad():
        fused_loss = model(**batch, labels=labels).loss
    assert float(fused_loss) == pytest.approx(float(chunked), abs=2e-2)


def test_float8_loss_curve_follows_bf16() -> None:
    """300 steps of a small model learning a repeating pattern, bf16 against float8 (rowwise): the curves
    stay within 5% of each other, and both learn."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matrix products need compute capability 8.9 or newer")
    from dolphin_train.model.load import convert_to_float8

    curves = []
    for fp8 in (False, True):
        model = _tiny_llama_on_gpu(hidden=512, layers=4)
        if fp8:
            convert_to_float8(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        generator = torch.Generator(device="cuda").manual_seed(0)
        losses = []
        for _ in range(300):
            start = torch.randint(3, 900, (8, 1), device="cuda", generator=generator)
            ids = (start + torch.arange(256, device="cuda") % 97) % 1000
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        curves.append(torch.tensor(losses).view(-1, 30).mean(dim=1))
    bf16, fp8 = curves
    assert bf16[-1] < 0.5 * bf16[0] and fp8[-1] < 0.5 * fp8[0]
    assert torch.all((fp8 - bf16).abs() <= 0.05 * bf16), f"bf16 {bf16.tolist()} fp8 {fp8.tolist()}"
