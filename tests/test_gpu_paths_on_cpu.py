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
- The Gemma 4 hybrid split's sliding-window layers: the entry point with the flash-attn 2 reference.

Further down, the training side: the code written for a GPU, run on the CPU through stand-ins: Liger beside
the fused LoRA MLP (issue 22, D5) and beside LoRA on the output head, fp16 with the optimizer step in the
backward pass (D6), the
throughput meter without a device synchronisation per micro batch, the peak memory measured from the start of
training, compiled layers under inductor with the shapes packing produces, the Trainer's activation offloading
and the compiled in-backward optimizer step.

The CUDA-only branches of src/ outside attention (found by grepping for `torch.cuda`, `is_available()`,
`device == "cuda"`, `device.type`, `"nccl"`, `pin_memory`), each with the CPU test that runs the same code, or
why none can (scripts/gpu_check.sh runs those; tests/test_gpu_train_paths.py and tests/test_gpu.py):

- Liger's kernels (`use_liger`, model/kernel_choice.py; the Trainer applies them at `train()`): a stand-in
  liger_kernel package that patches as Liger 0.8 does, `test_liger_leaves_the_fused_lora_mlp_in_place`;
  `plan` with Liger installed: `test_the_plan_counts_the_mlp_that_runs_under_liger`; its fused loss beside LoRA
  on the head: `test_lora_on_the_output_head_trains_where_liger_applies`. Liger's Triton kernels: no stand-in.
- the throughput meter's counting (`count_batch` on batches already on the GPU; recipe `_throughput_meter` adds
  MFU on CUDA + bf16): meta tensors, whose values cannot be read,
  `test_counting_a_micro_batch_reads_no_value_from_the_device`; MFU's arithmetic: tests/test_throughput.py.
- the peak memory reset when training begins (outputs `reset_peak_memory`, CUDA only): the callback's place in
  a training run, `test_peak_memory_is_measured_from_the_first_training_step`, and its CUDA call with a
  recording stand-in, `test_the_peak_reset_is_cuda_s_own`; `torch.cuda.max_memory_allocated`: no stand-in.
- `torch_compile` (`auto`: on on CUDA) with inductor and packing's dynamic shapes:
  `test_inductor_compiled_layers_on_packed_rows_of_changing_length` (C++ code on the CPU; Triton: no stand-in).
- activation offloading (arguments `checkpointing_kwargs` offloads on CUDA only), and the other CUDA-only
  TrainingArguments (`dataloader_pin_memory`, `tf32`): the arguments a GPU run builds drive the Trainer in
  `test_the_trainer_offloads_the_checkpointed_layer_inputs`, pinning replaced by a plain host copy.
- the in-backward optimizer step compiled (trainer `eager=self.args.device.type == "cpu"`):
  `test_the_compiled_in_backward_step_gives_the_eager_updates`.
- fp16 mixed precision (resolve: `fp16: true` needs CUDA; the Trainer's GradScaler): with
  `optimizer_in_backward`, refused at load, `test_fp16_with_optimizer_in_backward_is_refused`; the scaler
  itself: no stand-in.
- float8 training (torchao, capability 8.9+): emulated in tests/test_compile.py; its kernels: no stand-in.
- LoftQ's SVD on the GPU when there is one (model/loftq.py): the same function on the CPU, tests/test_loftq.py.
- `liger_rms_norm_gated` (model/load.py, compiled on CUDA only): tests/test_gemma4.py passes a CPU backend.
- what the machine can do (config/machine.py `Machine.detect`) and the settings resolved from it
  (config/resolve.py): `Machine` stand-ins for a GPU machine in tests/test_gemma4.py and tests/test_compile.py;
  `plan`'s GPU arithmetic (plan/memory.py) runs anywhere, tests/test_plan.py; `warn_if_memory_short` and
  `memory_budget` (recipe): tests/test_plan.py with a 64 MiB stand-in GPU.
- NCCL (process_group.py's backend and `set_device`, the collectives of control.py and throughput.py, FSDP,
  DeepSpeed, `Float8ScalesForFsdp`, Ray's GPU resources): the same code over gloo in tests/test_fsdp.py,
  tests/test_deepspeed.py, tests/test_distributed_loss.py, tests/test_ray.py; NCCL itself: no stand-in.
  peft's CUDA-only gather under ZeRO-3 (adapters `_zero3_without_cuda`): the CPU branch only.
- bitsandbytes on CUDA (its CUDA 4-bit layout and kernels, read by model/quantised.py): no stand-in runs them;
  the CPU layouts are read in the CPU tests of the fused LoRA functions and ReLoRA.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import attention_kernels as ref
from conftest import REPO, tiny_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.resolve import FA2_VARLEN, SDPA_VARLEN, VARLEN, RuntimeSettings
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


# ---- the training side (issue 22: D5, D6, the smaller items, Deliver 3) ----------------------------------

LORA = {"adapter": "lora", "lora_target_linear": True, "lora_dropout": 0.0}
CPU = RuntimeSettings("cpu", False, False, False, "sdpa", "", 1, "single process")
GPU_WITH_LIGER = RuntimeSettings("cuda", False, False, False, "sdpa", "", 1, "single process", liger=True)


# ---- D5: Liger and the fused LoRA MLP -------------------------------------------------------------------------


@pytest.fixture
def stand_in_liger(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A `liger_kernel` package that patches a model instance as Liger 0.8 does (read from its source): the
    kernel choice passed as keyword arguments, kept where the model type's apply function takes them, and each
    decoder layer's MLP given Liger's SwiGLU forward bound on the instance (`module.__dict__["forward"]`),
    which wins over any class. Its SwiGLU computes in plain PyTorch and records that it ran."""
    ran: list[str] = []

    def swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        ran.append("liger swiglu")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fused_loss_forward(self: Any, input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Any:
        """Liger's fused output head + loss: it reads the head's weight (`lm_head.weight`), not its forward."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        ran.append("liger fused loss")
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = F.linear(hidden, self.lm_head.weight).float()
        return CausalLMOutputWithPast(loss=F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))

    def apply_to_llama(rope: bool = True, cross_entropy: bool = False, fused_linear_cross_entropy: bool = True,
                       rms_norm: bool = True, swiglu: bool = True, model: Any = None) -> None:  # fmt: skip
        if fused_linear_cross_entropy:
            model.forward = types.MethodType(fused_loss_forward, model)
        base = getattr(model, model.base_model_prefix, model)
        for layer in base.layers:
            if swiglu:
                layer.mlp.__dict__["forward"] = swiglu_forward.__get__(layer.mlp, type(layer.mlp))

    def apply_to_instance(model: Any, **kwargs: Any) -> None:
        apply = {"llama": apply_to_llama}[model.config.model_type]
        apply(model=model, **{k: v for k, v in kwargs.items() if k in inspect.signature(apply).parameters})

    package = types.ModuleType("liger_kernel")
    package.__version__, package.__file__, package.__path__ = "0.8.5", "<stand-in>", []
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    submodule = types.ModuleType("liger_kernel.transformers")
    submodule.__spec__ = importlib.machinery.ModuleSpec("liger_kernel.transformers", None)
    submodule._apply_liger_kernel_to_instance = apply_to_instance
    package.transformers = submodule
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", submodule)
    from transformers.utils.import_utils import is_liger_kernel_available

    is_liger_kernel_available.cache_clear()  # transformers remembers whether the package is there
    yield ran
    monkeypatch.undo()
    is_liger_kernel_available.cache_clear()


def _model_as_training_builds_it(cfg: Any) -> Any:
    from dolphin_train.model.load import load_model
    from dolphin_train.model.tokenizer import load_tokenizer

    return load_model(cfg, CPU, load_tokenizer(cfg))


def _mlp_backward_names_under_liger(cfg: Any) -> tuple[list[str], int]:
    """The model as training builds it, Liger applied as the Trainer applies it at the start of `train()`
    (with the settings `liger_settings` chose), one step: the autograd node each decoder MLP's output has,
    and the number of layers."""
    from transformers.integrations.liger import apply_liger_kernel

    from dolphin_train.model.layers import decoder_layers
    from dolphin_train.train.arguments import liger_settings

    model = _model_as_training_builds_it(cfg)
    settings = liger_settings(cfg, GPU_WITH_LIGER)
    assert settings is not None  # Liger is applied: its other kernels still run
    apply_liger_kernel(model, settings)
    outputs: list[str] = []
    layers = decoder_layers(model)
    for layer in layers:
        layer.mlp.register_forward_hook(lambda module, args, out: outputs.append(out.grad_fn.name()))
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    return outputs, len(layers)


def test_liger_leaves_the_fused_lora_mlp_in_place(tmp_path: Path, stand_in_liger: list[str]) -> None:
    """`lora_mlp_kernel: true` with Liger on (its default on CUDA): the model set-up swaps in the fused MLP,
    then the Trainer applies Liger. The fused MLP must be what runs: Liger's RMSNorm, RoPE and loss still
    apply, its SwiGLU does not."""
    cfg = validate_mapping(tiny_config(tmp_path, **LORA, lora_mlp_kernel=True))
    names, layers = _mlp_backward_names_under_liger(cfg)
    assert stand_in_liger == ["liger fused loss"]  # Liger applied, but not its MLP
    assert names == ["FusedLoRAGatedMLPBackward"] * layers


def test_liger_leaves_the_tiled_mlp_in_place(tmp_path: Path, stand_in_liger: list[str]) -> None:
    """`tiled_mlp: true` with Liger on: the tiled MLP (a subclass, as the fused one) must be what runs, not
    Liger's SwiGLU bound onto each MLP instance; Liger's loss still applies."""
    cfg = validate_mapping(tiny_config(tmp_path, tiled_mlp=True, tiled_mlp_num_shards=2))
    names, layers = _mlp_backward_names_under_liger(cfg)
    assert stand_in_liger == ["liger fused loss"]  # Liger applied, but not its MLP
    assert names == ["TiledMLPFunctionBackward"] * layers


def test_lora_on_the_output_head_trains_where_liger_applies(tmp_path: Path, stand_in_liger: list[str]) -> None:
    """Liger's fused output head + loss computes the logits from `lm_head.weight`: with LoRA on the head
    (`lm_head` in `lora_target_modules`) that is the frozen base weight, and the head's adapter would get no
    gradient. Liger's other kernels still apply; its fused loss does not."""
    from dataclasses import replace

    from transformers.integrations.liger import apply_liger_kernel

    from dolphin_train.model.load import load_model
    from dolphin_train.model.tokenizer import load_tokenizer
    from dolphin_train.train.arguments import liger_settings

    cfg = validate_mapping(tiny_config(tmp_path, adapter="lora", lora_dropout=0.0,
                                       lora_target_modules=["q_proj", "v_proj", "lm_head"]))  # fmt: skip
    # A tokenizer that has its template's tokens already (as Qwen's has ChatML's): none added, whose head rows
    # peft could not train beside a LoRA-adapted head.
    model = load_model(cfg, CPU, replace(load_tokenizer(cfg), new_token_ids=[]))
    settings = liger_settings(cfg, GPU_WITH_LIGER)
    assert settings is not None
    apply_liger_kernel(model, settings)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    head = model.base_model.model.lm_head
    assert head.lora_B["default"].weight.grad is not None and head.lora_B["default"].weight.grad.abs().sum() > 0
    assert "liger fused loss" not in stand_in_liger


def test_liger_kernels_that_cannot_run_as_asked_are_refused(tmp_path: Path) -> None:
    from dolphin_train.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_mlp_kernel: true and liger_glu_activation: true"):
        validate_mapping(tiny_config(tmp_path, **LORA, lora_mlp_kernel=True, liger_glu_activation=True))
    with pytest.raises(ConfigError, match="liger_fused_linear_cross_entropy: true computes the logits from"):
        validate_mapping(tiny_config(tmp_path, adapter="lora", lora_target_modules=["q_proj", "lm_head"],
                                     liger_fused_linear_cross_entropy=True))  # fmt: skip


def test_the_plan_counts_the_mlp_that_runs_under_liger(tmp_path: Path, stand_in_liger: list[str]) -> None:
    """Planned for a GPU with Liger installed: with `lora_mlp_kernel` the fused MLP runs and is counted, as
    without Liger; without it Liger's SwiGLU runs (it keeps the gate and up projections, the plain MLP also
    their activation) and is counted, between the two."""
    from dolphin_train.plan.report import make_plan, parse_memory

    def activations(**keys: Any) -> int:
        raw = tiny_config(tmp_path, **LORA, **keys)
        return make_plan(validate_mapping(raw), gpus=1, gpu_memory=parse_memory("80GB")).memory.activations

    fused, fused_without_liger = activations(lora_mlp_kernel=True), activations(lora_mlp_kernel=True,
                                                                                liger_kernel=False)  # fmt: skip
    liger, plain = activations(), activations(liger_kernel=False)
    assert fused == fused_without_liger
    assert fused < liger < plain


def test_the_plan_counts_liger_s_rms_norm_and_plans_for_a_machine_with_or_without_liger(tmp_path: Path) -> None:
    """Liger's RMSNorm keeps its input and a float32 scale per token, not a float32 copy of its input: counted
    where Liger will apply it. `plan --liger/--no-liger` plans for a GPU machine whose packages differ from this
    one's (none here: Liger is not installed on the test machine)."""
    from dolphin_train.plan.report import make_plan, parse_memory

    def activations(liger: bool, **keys: Any) -> int:
        cfg = validate_mapping(tiny_config(tmp_path, liger_glu_activation=False, **keys))
        return make_plan(cfg, gpus=1, gpu_memory=parse_memory("80GB"), liger=liger).memory.activations

    plain = activations(liger=False)
    assert activations(liger=True) < plain
    assert activations(liger=True, liger_rms_norm=False) == plain
    cfg = validate_mapping(tiny_config(tmp_path))
    assert make_plan(cfg, gpus=1, gpu_memory=parse_memory("80GB"), liger=True).runtime.liger
    assert not make_plan(cfg, gpus=1, gpu_memory=parse_memory("80GB")).runtime.liger  # as installed here


# ---- D6: fp16 and the optimizer step in the backward pass -----------------------------------------------------


def test_fp16_with_optimizer_in_backward_is_refused(tmp_path: Path) -> None:
    """fp16 mixed precision scales the loss (the Trainer's GradScaler) and unscales the gradients and skips a step
    with inf/NaN gradients in `optimizer.step()`; the in-backward updates happen before that, on scaled
    gradients with no check. Refused at load (exit 2), naming both keys."""
    from dolphin_train.errors import ConfigError

    raw = tiny_config(tmp_path, optimizer_in_backward=True, max_grad_norm=0.0, bf16=False, fp16=True)
    with pytest.raises(ConfigError, match="fp16: true with optimizer_in_backward") as refused:
        validate_mapping(raw)
    assert refused.value.exit_code == 2
    validate_mapping({**raw, "fp16": False})  # bf16 or float32: the gradients are the true ones


# ---- the throughput meter: no device synchronisation per micro batch -----------------------------------------


def _meter_batch() -> dict[str, torch.Tensor]:
    """Two rows of 16: conversations of 5 and 9 tokens then 2 of padding (positions restart, no trained label);
    one of 16."""
    position_ids = torch.tensor([[*range(5), *range(9), 0, 1], list(range(16))])
    labels = torch.full((2, 16), -100)
    labels[0, 1:5] = labels[0, 6:14] = labels[1, 1:] = 7
    return {"position_ids": position_ids, "labels": labels}


def test_counting_a_micro_batch_reads_no_value_from_the_device() -> None:
    """On CUDA the Trainer hands `training_step` the batch already on the GPU: reading any value there (`.cpu()`,
    `.item()`, `int()`) waits for the GPU to finish the previous micro batch. Meta tensors stand in for such a
    batch: they have no values, so any read fails. The counts are read once per log, and are the exact ones."""
    from dolphin_train.train.throughput import ModelFlops, ThroughputMeter

    flops = ModelFlops(trained=1000, frozen=200, layer_params=900, layers=2, attention_width=32, checkpointed_layers=2)
    on_device = ThroughputMeter(flops, peak=1e12)
    for _ in range(3):
        on_device.count_batch({k: v.to("meta") for k, v in _meter_batch().items()})
    meter = ThroughputMeter(flops, peak=1e12)
    for _ in range(3):
        meter.count_batch(_meter_batch())
    assert meter.counted_since_last_log() == (3 * (5 + 9 + 16), 3 * (25 + 81 + 256))
    assert meter.counted_since_last_log() == (0, 0)  # read at a log, and counted afresh after it


def test_transformers_does_not_count_tokens_each_micro_batch(tmp_path: Path) -> None:
    """transformers' `include_num_input_tokens_seen` calls `.item()` on every micro batch's count; the meter
    counts them instead."""
    from dolphin_train.train.arguments import build_training_arguments
    from dolphin_train.train.schedule import compute_schedule

    cfg = validate_mapping(tiny_config(tmp_path))
    args = build_training_arguments(cfg, CPU, compute_schedule(cfg, 100, 1, has_eval=False))
    assert args.include_num_input_tokens_seen == "no"


# ---- peak memory: training's own, not the set-up's -------------------------------------------------------------


def test_peak_memory_is_measured_from_the_first_training_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`peak_memory_mb` is the CUDA allocator's peak; the set-up (loading, LoftQ's SVDs, quantisation) peaks
    higher than training can, so the peak is reset when training begins: once, after the model and the
    Trainer's own set-up, before the first step."""
    from dolphin_train.recipe import set_up_run

    run = set_up_run(validate_mapping(tiny_config(tmp_path, max_steps=2, micro_batch_size=2)))
    resets: list[int] = []
    monkeypatch.setattr("dolphin_train.train.outputs.reset_peak_memory",
                        lambda device: resets.append(run.trainer.state.global_step))  # fmt: skip
    run.trainer.train()
    assert resets == [0] and run.trainer.state.global_step == 2


def test_the_peak_reset_is_cuda_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from dolphin_train.train.outputs import reset_peak_memory

    reset: list[str] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: reset.append(str(device)))
    reset_peak_memory(torch.device("cpu"))  # the process's resident high-water mark cannot be reset
    reset_peak_memory(torch.device("cuda", 0))
    assert reset == ["cuda:0"]


# ---- compiled layers under inductor, with the shapes packing produces ------------------------------------------


def _packed_rows(length: int, seed: int) -> list[dict[str, list[int]]]:
    """Two rows of conversations of random lengths, the longer `length` tokens: as packing without
    `pad_to_sequence_len` gives them (the collator pads to the longest row, a multiple of 8)."""
    import random

    rng = random.Random(seed)
    rows = []
    for total in (length, max(1, length - rng.randint(1, 7))):
        cut = sorted(rng.sample(range(1, total), min(2, total - 1)))
        conversations = [b - a for a, b in zip([0, *cut], [*cut, total], strict=True)]
        ids = [rng.randint(3, 2000) for _ in range(total)]
        rows.append({"input_ids": ids, "labels": ids, "position_ids": [p for n in conversations for p in range(n)]})
    return rows


@pytest.mark.slow
def test_inductor_compiled_layers_on_packed_rows_of_changing_length(tmp_path: Path) -> None:
    """`torch_compile` as a GPU run has it (`auto` there): inductor, which generates code (C++ on the CPU, Triton
    on CUDA), each decoder layer compiled by `compile_layers` with its lengths marked dynamic. 20 micro batches
    of packed rows, each of another length, train through one compiled graph (shared by all the layers): no
    recompilation, and the eager model's loss and gradients."""
    import copy

    from torch._dynamo.utils import counters

    from dolphin_train.model.load import compile_layers
    from dolphin_train.model.tokenizer import load_tokenizer
    from dolphin_train.train.collator import ChatCollator

    cfg = validate_mapping(tiny_config(tmp_path, sample_packing=True, torch_compile=True,
                                       torch_compile_backend="inductor"))  # fmt: skip
    tok = load_tokenizer(cfg)
    model = _model_as_training_builds_it(cfg).train()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(model, cfg, CPU)
    collate = ChatCollator(tok.tokenizer.pad_token_id)
    lengths = [8 * k for k in (11, 5, 13, 2, 20, 7, 16, 3, 9, 18, 1, 14, 6, 19, 10, 4, 17, 12, 8, 15)]
    for i, length in enumerate(lengths):
        batch = collate(_packed_rows(length, seed=i))
        assert batch["input_ids"].shape[1] == length
        loss = model(**batch).loss
        loss.backward()
        if i < 2:  # the compiled layers compute what the eager ones do
            reference = eager(**batch).loss
            reference.backward()
            assert float(loss) == pytest.approx(float(reference), rel=1e-5)
            for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
                if p.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph: no recompilation
    assert counters["frames"]["total"] == 1 and not counters["recompiles"]


# ---- activation offloading through the Trainer ----------------------------------------------------------------


@pytest.mark.slow
def test_the_trainer_offloads_the_checkpointed_layer_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`activation_offloading: true` asks transformers to keep each checkpointed layer's saved input in pinned
    host memory (`offload` in the checkpointing options: on CUDA only, where there is a device to offload
    from). Here the arguments a GPU run builds drive the Trainer on the CPU; the one CUDA part, pinning, is
    replaced by a plain host copy that records what it holds. Every checkpointed layer's input goes through it,
    and training gives exactly the losses of the run that keeps them in place."""
    from dataclasses import replace

    from torch.autograd.graph import save_on_cpu

    from dolphin_train.recipe import set_up_run
    from dolphin_train.train.arguments import build_training_arguments, checkpointing_kwargs
    from dolphin_train.train.trainer import DolphinTrainer

    offloaded: list[torch.Size] = []

    class HostCopy(save_on_cpu):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            super().__init__(pin_memory=False, device_type=device_type)  # no pinned memory without a GPU
            pack = self.pack_hook
            self.pack_hook = lambda tensor: (offloaded.append(tensor.shape), pack(tensor))[1]

    monkeypatch.setattr("transformers.modeling_utils.save_on_cpu", HostCopy)
    keys = {"max_steps": 3, "micro_batch_size": 2, "sample_packing": True, "sequence_len": 256,
            "gradient_checkpointing": True}  # fmt: skip

    def losses(trainer: Any) -> list[float]:
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    in_place = set_up_run(validate_mapping(tiny_config(tmp_path / "in_place", **keys)))
    expected = losses(in_place.trainer)
    assert offloaded == []

    cfg = validate_mapping(tiny_config(tmp_path / "offloaded", **keys, activation_offloading=True))
    run = set_up_run(cfg)
    gpu = replace(run.runtime, device="cuda")
    assert checkpointing_kwargs(cfg, run.runtime) == {} and checkpointing_kwargs(cfg, gpu) == {"offload": True}
    args = build_training_arguments(cfg, gpu, run.schedule)
    trainer = DolphinTrainer(model=run.trainer.model, args=args, train_dataset=run.rows.train,
                             data_collator=run.trainer.data_collator)  # fmt: skip
    assert losses(trainer) == expected
    layers, hidden = run.trainer.model.config.num_hidden_layers, run.trainer.model.config.hidden_size
    assert len(offloaded) >= 3 * layers and all(shape[-1] == hidden for shape in offloaded)


# ---- the optimizer step in the backward pass, compiled as on a GPU ----------------------------------------------


@pytest.mark.slow
def test_the_compiled_in_backward_step_gives_the_eager_updates() -> None:
    """On a GPU each parameter's torchao 8-bit AdamW update is compiled (inductor); on the CPU the Trainer runs it
    eagerly (`eager=True`: compiling costs more than it saves there). The compiled path, run here on the CPU,
    gives the eager updates: the weights after three steps, and no gradient left behind. The weight is large
    enough for 8-bit state (4096 values or more), the bias keeps float32 state."""
    from dolphin_train.train.in_backward import OptimizerInBackward, parameter_optimizer

    def trained(eager: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 128)
        make = parameter_optimizer("adamw_torch_8bit", 1e-2, (0.9, 0.999), 1e-8)
        optimizer = OptimizerInBackward(layer.named_parameters(), make, 1e-2, 0.1, {"weight"}, eager=eager)
        inputs = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(1))
        for x in inputs:
            layer(x).square().mean().backward()  # each parameter updated as its gradient completes
            assert all(p.grad is None for p in layer.parameters())
        optimizer.remove_hooks()
        return {n: p.detach().clone() for n, p in layer.named_parameters()}

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = trained(eager=True)
    assert not counters["stats"]["unique_graphs"]
    compiled = trained(eager=False)
    assert counters["stats"]["unique_graphs"] == 2  # the 8-bit state's update and the float32 one
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, atol=1e-6, rtol=1e-5, msg=name)
    torch.manual_seed(0)
    start = torch.nn.Linear(64, 128).weight.detach()
    assert not torch.equal(compiled["weight"], start)  # it trained
