"""The GPU attention paths run on the CPU: our one attention entry point (model/attention.py) with reference
kernels of the real kernels' exact signatures (tests/attention_kernels.py) in place of flash-attn's and
PyTorch's CUDA kernels, checked against eager/SDPA attention in float32: packed rows at micro batch 3 equal
each conversation alone, generation with the KV cache (left padding included), Mistral's sliding window,
Gemma-2's logit softcap and query scale, GQA, and every PyTorch varlen signature from 2.10 to 2.13. The
seed recipe's shape in miniature trains through the flash-attn code path with the same per-step loss as SDPA.
scripts/gpu_check.sh runs the real kernels on a GPU (tests/test_gpu.py).

The attention code that only a CUDA machine reaches, and what runs it here:
- flash-attn 2's kernel (`flash_attention: true` with flash-attn, `attn_implementation: flash_attention_2`):
  the entry point with `flash_attn_varlen_func`'s reference, and the recipe through the very import of
  `flash_attn` (test_seed_recipe...); the CUDA kernel itself: gpu_check (no stand-in can be it).
- flash-attn 3's kernel: the entry point with its reference; the kernel needs a Hopper GPU and a build of
  flash-attn 3, which gpu_check does not have.
- PyTorch's varlen kernel (chosen only on CUDA): the entry point with each signature's reference; the CUDA
  kernel: gpu_check.
- The cast of float32 inputs to 16-bit for the CUDA kernels (`_kernel_dtype`, full fine-tuning under
  autocast): it acts on CUDA tensors only; gpu_check (test_varlen_backend_under_autocast_with_float32_weights).
- The choice of backend on a machine with CUDA and flash-attn: resolved here for a described machine.
- The Gemma 4 hybrid split's sliding-window layers: the entry point with the flash-attn 2 reference."""

from __future__ import annotations

import importlib.machinery
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attention_kernels as ref
from conftest import REPO, tiny_config, write_jsonl
from dolphin_train.config.resolve import FA2_VARLEN, SDPA_VARLEN, VARLEN
from dolphin_train.data.packing import PackedRows
from dolphin_train.model.attention import (
    BOUNDARY_KEYS,
    backend_for_model,
    register_packed_attention,
    sequence_boundaries,
)
from dolphin_train.model.attention_kernels import UnsupportedAttention, VarlenKernel, sdpa_varlen_attn
from dolphin_train.train.collator import ChatCollator

LENGTHS = [[9, 4], [15, 6, 3], [11, 7]]  # three packed rows: micro batch 3
KERNELS = {**ref.KERNELS, "sdpa_varlen": sdpa_varlen_attn}  # the references, and our SDPA kernel


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    ref.CALLS.clear()


def _backend(kernel: str) -> str:
    """Our entry point registered with the named reference kernel; returns the backend's name (without
    "flash" in it: transformers treats such names as flash-attn requests)."""
    name = f"reference_{kernel.replace('flash_attn', 'fa')}"
    return register_packed_attention(name, VarlenKernel(KERNELS[kernel], kernel))


def _llama(**overrides: Any) -> LlamaForCausalLM:
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _packed_batch(lengths: list[list[int]], boundaries: bool, vocab: int = 97) -> tuple[dict, list[torch.Tensor]]:
    """Conversations packed `lengths[i]` into row i, collated as training collates them; and each alone."""
    rng = np.random.default_rng(3)
    convs = [{"input_ids": rng.integers(3, vocab, n).tolist(), "labels": rng.integers(3, vocab, n).tolist()}
             for row in lengths for n in row]  # fmt: skip
    bins, at = [], 0
    for row in lengths:
        bins.append(list(range(at, at + len(row))))
        at += len(row)

    class Rows:
        def __getitem__(self, idx: list[int]) -> dict[str, list]:
            return {k: [convs[i][k] for i in idx] for k in ("input_ids", "labels")}

    packed = PackedRows(Rows(), layout=type("Layout", (), {"bins": bins})())
    batch = ChatCollator(pad_token_id=0, boundaries=boundaries)([packed[i] for i in range(len(lengths))])
    return batch, [torch.tensor(c["input_ids"])[None] for c in convs]


def _per_conversation(logits: torch.Tensor, lengths: list[list[int]]) -> list[torch.Tensor]:
    out = []
    for row, row_lengths in enumerate(lengths):
        at = 0
        for n in row_lengths:
            out.append(logits[row, at : at + n])
            at += n
    return out


# ---- 1. packed rows at micro batch 3 = each conversation alone, per backend --------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_varlen", "flash_attn_2", "flash_attn_3", "torch_2_10", "torch_2_13"])
@pytest.mark.parametrize("boundaries", ["collator", "position ids"])
def test_packed_micro_batch_3_equals_each_conversation_alone(backend: str, boundaries: str) -> None:
    model = _llama()
    batch, alone = _packed_batch(LENGTHS, boundaries=boundaries == "collator")
    with torch.no_grad():
        reference = [model(input_ids=ids).logits[0] for ids in alone]  # SDPA, one conversation at a time
        model.set_attn_implementation(backend if backend == "sdpa" else _backend(backend))
        packed = model(**batch, use_cache=False).logits  # as training runs
    for got, want in zip(_per_conversation(packed, LENGTHS), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if backend.startswith(("flash", "torch")):  # both layers ran the kernel over the 7 conversations and 3 paddings
        expected = sequence_boundaries(batch["position_ids"])["cu_seq_lens_q"].tolist()
        assert [c["cu_q"] for c in ref.CALLS] == [expected, expected]


def test_collator_computes_the_boundaries_once_per_batch_over_the_flattened_rows() -> None:
    batch, _ = _packed_batch([[3, 2], [4]], boundaries=True)
    assert batch["input_ids"].shape == (2, 8)  # rows padded to a multiple of 8: a padding "sequence" each
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 12, 16] == batch["cu_seq_lens_k"].tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == batch["max_length_k"] == 4
    plain, _ = _packed_batch([[3, 2], [4]], boundaries=False)
    assert not set(BOUNDARY_KEYS) & set(plain)  # other backends get the batch as before


def test_boundaries_from_position_ids_are_read_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    import dolphin_train.model.attention as attention

    reads = []
    derive = attention.cu_seqlens_from_position_ids
    monkeypatch.setattr(attention, "cu_seqlens_from_position_ids", lambda p: reads.append(1) or derive(p))
    model = _llama(num_hidden_layers=3)
    batch, _ = _packed_batch(LENGTHS, boundaries=False)
    model.set_attn_implementation(_backend("torch_2_13"))
    with torch.no_grad():
        model(**batch, use_cache=False)
        assert len(ref.CALLS) == 3 and len(reads) == 1  # three layers, one reading
        model(**_packed_batch(LENGTHS, boundaries=False)[0], use_cache=False)
        assert len(ref.CALLS) == 6 and len(reads) == 2  # a new batch: read again


def test_transformers_flash_path_sees_packing_only_in_a_batch_of_one() -> None:
    """Why flash-attn goes through our entry point (D1): transformers' own flash path treats position ids as
    packed only when the batch has one row; at micro batch 3 it would run dense causal attention across the
    packed conversations. Pinned here so that a transformers upgrade that changes it is noticed. Also pinned:
    the boundary kwargs' names are the ones its models forward to the attention function."""
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs, _is_packed_sequence

    batch, _ = _packed_batch(LENGTHS, boundaries=False)
    positions = batch["position_ids"]
    assert _is_packed_sequence(positions[:1], 1) and not _is_packed_sequence(positions, 3)
    assert set(BOUNDARY_KEYS) == set(FlashAttentionKwargs.__annotations__)


# ---- 2. the seed recipe in miniature through the flash-attn code path ----------------------------------------


def _step_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flash: bool,
                 flash_attention: bool = True) -> tuple[list[float], Any]:  # fmt: skip
    """configs/llama3-8b.yml's shape with the repository's tiny Llama: micro batch 3, packing padded to the
    sequence length, `flash_attention: true`, float32. `flash`: this CPU described as a machine with flash-attn,
    whose `flash_attn_varlen_func` is the reference (a stand-in `flash_attn` package)."""
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.config.machine import Machine
    from dolphin_train.recipe import set_up_run

    machine = Machine(device="cpu", bf16=False, tf32=False, varlen_attention=False, flash_attn=flash, liger=False)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls: machine))
    module = ref.fake_flash_attn_module()
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:24]]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows), sequence_len=256, sample_packing=True,
                      pad_to_sequence_len=True, micro_batch_size=3, gradient_accumulation_steps=2,
                      flash_attention=flash_attention, max_steps=3, max_grad_norm=1.0, train_on_inputs=False,
                      weight_decay=0.05, lr_scheduler="cosine", warmup_steps=0)  # fmt: skip
    run = set_up_run(validate_mapping(raw))
    run.trainer.train()
    losses = [entry["loss"] for entry in run.trainer.state.log_history if "loss" in entry]
    return losses, run


@pytest.mark.slow
def test_seed_recipe_in_miniature_flash_path_gives_the_sdpa_losses(tmp_path: Path, monkeypatch: Any) -> None:
    flash, run = _step_losses(tmp_path / "flash", monkeypatch, flash=True)
    assert run.runtime.attn_implementation == FA2_VARLEN
    assert run.trainer.model.config._attn_implementation == FA2_VARLEN
    kernels = {c["kernel"] for c in ref.CALLS}
    packed_rows = max(len(c["cu_q"]) - 1 for c in ref.CALLS)
    assert kernels == {"flash_attn_2"} and packed_rows > 3  # the reference ran, over several sequences per row
    sdpa, run = _step_losses(tmp_path / "sdpa", monkeypatch, flash=False, flash_attention=False)
    assert run.trainer.model.config._attn_implementation == "sdpa"  # transformers' SDPA, block-diagonal mask
    assert len(flash) == len(sdpa) == 3
    np.testing.assert_allclose(flash, sdpa, rtol=0, atol=1e-5)
    cpu, run = _step_losses(tmp_path / "cpu", monkeypatch, flash=False)  # the flash path on a CPU: SDPA kernel
    assert run.trainer.model.config._attn_implementation == SDPA_VARLEN
    np.testing.assert_allclose(cpu, sdpa, rtol=0, atol=1e-5)


# ---- 3. generation with the KV cache, batched with left padding (D2) -----------------------------------------


def _generate(model: Any, backend: str, prompts: list[list[int]], steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.set_attn_implementation(backend)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=True,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("kernel", ["flash_attn_2", "torch_2_13", "torch_2_10", "sdpa_varlen"])
@pytest.mark.parametrize("prompts", [[[5, 17, 3, 44, 8]], [[5, 17, 3, 44, 8], [9, 2], [61, 7, 7, 30, 11, 4, 90]]],
                         ids=["one row", "left padding"])  # fmt: skip
def test_generation_with_the_cache_equals_eager(kernel: str, prompts: list[list[int]]) -> None:
    model = _llama()
    want_ids, want_logits = _generate(model, "eager", prompts)
    got_ids, got_logits = _generate(model, _backend(kernel), prompts)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    if kernel != "sdpa_varlen":  # decoding steps (one query per row) went through the kernel
        assert any(c["max_q"] == 1 for c in ref.CALLS)


def test_right_padded_rows_without_a_cache_equal_eager() -> None:
    """The evaluation's reference perplexity pads on the right and passes a mask, with no cache."""
    model = _llama()
    ids = torch.tensor([[5, 17, 3, 44, 8, 0, 0], [61, 7, 7, 30, 11, 4, 90]])
    mask = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(_backend("flash_attn_2"))
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


# ---- 4. sliding window (Mistral) and logit softcap with a query scale (Gemma-2) (D3) ------------------------


def _mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def _gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          query_pre_attn_scalar=8, attn_logit_softcapping=0.5, final_logit_softcapping=None,
                          pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # scores large enough for the softcap to matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


@pytest.mark.parametrize(("family", "kernel"), [("mistral", "flash_attn_2"), ("mistral", "torch_2_13"),
                                                 ("mistral", "torch_main_window"), ("mistral", "sdpa_varlen"),
                                                 ("gemma2", "flash_attn_2"), ("gemma2", "flash_attn_3")])  # fmt: skip
def test_sliding_window_and_softcap_packed_at_micro_batch_3_equal_eager(family: str, kernel: str) -> None:
    model = _mistral() if family == "mistral" else _gemma2()
    batch, alone = _packed_batch(LENGTHS, boundaries=True)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        reference = [model(input_ids=ids).logits[0] for ids in alone]
        model.set_attn_implementation(_backend(kernel))
        packed = model(**batch, use_cache=False).logits  # as training runs
    for got, want in zip(_per_conversation(packed, LENGTHS), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    windows = {tuple(c["window_size"]) for c in ref.CALLS if "window_size" in c}
    assert kernel == "sdpa_varlen" or (3, 0) in windows  # a window of 4 tokens reached the kernel as 3 keys left
    if family == "gemma2" and kernel == "flash_attn_2":
        assert {c["softcap"] for c in ref.CALLS} == {0.5}


def test_sliding_window_generation_with_the_cache_equals_eager() -> None:
    model = _mistral()
    prompts = [[5, 17, 3, 44, 8, 12, 19], [9, 2]]
    want_ids, want_logits = _generate(model, "eager", prompts, steps=5)
    got_ids, got_logits = _generate(model, _backend("flash_attn_2"), prompts, steps=5)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)


def test_a_kernel_without_a_feature_the_model_uses_is_never_run_without_it() -> None:
    """Load time: a backend that has the feature instead (logged). Run time: refused, never dropped."""
    torch_2_10 = VarlenKernel(ref.varlen_attn_2_10, "torch 2.10")
    gemma2, mistral = _gemma2().config, _mistral().config
    assert backend_for_model(VARLEN, torch_2_10, gemma2, longest=256)[0] == "eager"  # softcap: eager has it
    assert backend_for_model(VARLEN, torch_2_10, mistral, longest=256)[0] == SDPA_VARLEN  # the window: SDPA
    assert backend_for_model(VARLEN, torch_2_10, mistral, longest=4) == (VARLEN, None)  # rows within the window
    assert backend_for_model(VARLEN, VarlenKernel(ref.varlen_attn), gemma2, longest=256)[0] == "eager"
    assert backend_for_model(FA2_VARLEN, VarlenKernel(ref.flash_attn_varlen_func), gemma2, 256) == (FA2_VARLEN, None)
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(UnsupportedAttention, match="has no sliding window"):
        torch_2_10(q, q, q, cu, cu, 6, 6, scale=0.3, sliding_window=4)
    with pytest.raises(UnsupportedAttention, match="has no attention logit softcap"):
        VarlenKernel(ref.varlen_attn)(q, q, q, cu, cu, 6, 6, scale=0.3, softcap=5.0)
    torch_2_10(q, q, q, cu, cu, 6, 6, scale=0.3, sliding_window=6)  # no sequence reaches past the window


# ---- 5. every kernel signature (D4) -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("window", [None, 3])
def test_the_adapter_gives_each_signature_the_same_attention(kernel: str, window: int | None) -> None:
    """GQA heads, a scale other than 1/sqrt(head_dim), a decode-shaped sequence (fewer queries than keys) and
    a sliding window, through each kernel's own spelling, against the reference attention called directly."""
    torch.manual_seed(1)
    q, k, v = torch.randn(9, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu_q, cu_k = torch.tensor([0, 7, 9], dtype=torch.int32), torch.tensor([0, 7, 12], dtype=torch.int32)
    adapter = VarlenKernel(KERNELS[kernel], kernel)
    if window is not None and not adapter.window:
        with pytest.raises(UnsupportedAttention):
            adapter(q, k, v, cu_q, cu_k, 7, 7, scale=0.2, sliding_window=window)
        return
    got = adapter(q, k, v, cu_q, cu_k, 7, 7, scale=0.2, sliding_window=window)
    left = -1 if window is None else window - 1
    want = ref.attend(q, k, v, cu_q, cu_k, scale=0.2, causal=True, window=(left, 0))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if window is None:  # decoding: one query per sequence, its last token
        one = torch.tensor([0, 1, 2], dtype=torch.int32)
        got = adapter(q[[6, 8]], k, v, one, cu_k, 1, 7, scale=0.2)
        want = ref.attend(q[[6, 8]], k, v, one, cu_k, scale=0.2, causal=True)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ---- 6. the Gemma 4 hybrid split and the backend choice ---------------------------------------------------


def test_gemma4_hybrid_sliding_layers_run_the_entry_point_packed_at_micro_batch_3() -> None:
    """The sliding-window layers get flash-attn through our entry point (the reference kernel here), the
    global layer SDPA with transformers' block-diagonal mask: packed rows at micro batch 3 = each alone."""
    from transformers import Gemma4ForCausalLM

    from dolphin_train.model.attention import register_hybrid_attention, use_hybrid_attention
    from test_gemma4 import tiny_text_config

    torch.manual_seed(0)
    reference = Gemma4ForCausalLM._from_config(tiny_text_config(), attn_implementation="sdpa").eval()
    hybrid = Gemma4ForCausalLM._from_config(tiny_text_config(), attn_implementation=register_hybrid_attention())
    hybrid.load_state_dict(reference.state_dict())
    assert use_hybrid_attention(hybrid.eval(), sliding=_backend("flash_attn_2")) == 1
    batch, alone = _packed_batch(LENGTHS, boundaries=True, vocab=2048)
    with torch.no_grad():
        packed = hybrid(**batch, use_cache=False).logits
        expected = [reference(input_ids=ids).logits[0] for ids in alone]
    for got, want in zip(_per_conversation(packed, LENGTHS), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [(c["kernel"], c["window_size"]) for c in ref.CALLS] == [("flash_attn_2", (3, 0))]  # layer 0 only


@pytest.mark.parametrize(("keys", "machine", "backend"), [
    ({"flash_attention": True}, "cuda+flash-attn", FA2_VARLEN),
    ({"attention": "flash"}, "cuda+flash-attn", FA2_VARLEN),
    ({"attn_implementation": "flash_attention_2"}, "cpu", FA2_VARLEN),
    ({"attn_implementation": "flash"}, "cpu", FA2_VARLEN),
    ({"attn_implementation": "flash_attention_3"}, "cpu", "dolphin_fa3_varlen"),
    ({"flash_attention": True}, "cuda", VARLEN),
    ({"flash_attention": True}, "cpu", SDPA_VARLEN),
])  # fmt: skip
def test_every_flash_choice_resolves_to_our_entry_point(keys: dict, machine: str, backend: str) -> None:
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.config.machine import Machine
    from dolphin_train.config.resolve import resolve_attention

    cuda = machine.startswith("cuda")
    described = Machine(device="cuda" if cuda else "cpu", bf16=cuda, tf32=cuda, varlen_attention=cuda,
                        flash_attn=machine.endswith("flash-attn"), liger=False)  # fmt: skip
    cfg = validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], **keys})
    assert resolve_attention(cfg, described)[0] == backend


def test_non_causal_attention_and_attention_sinks_are_refused() -> None:
    from dolphin_train.model.attention import packed_attention_forward

    kernel = VarlenKernel(ref.flash_attn_varlen_func)
    q = torch.randn(1, 2, 5, 8)
    layer = torch.nn.Module()
    layer.is_causal = False
    with pytest.raises(UnsupportedAttention, match="bidirectional attention"):
        packed_attention_forward(layer, q, q, q, None, kernel=kernel)
    with pytest.raises(UnsupportedAttention, match="attention sinks"):
        packed_attention_forward(torch.nn.Module(), q, q, q, None, kernel=kernel, s_aux=torch.zeros(2))
    out, _ = packed_attention_forward(torch.nn.Module(), q, q, q, None, kernel=kernel)
    assert out.shape == (1, 5, 2, 8)
