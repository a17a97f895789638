"""The training paths written for a GPU, on the real kernels: what the stand-ins of
tests/test_gpu_paths_on_cpu.py cannot run. Liger with and without the fused LoRA MLP (which MLP runs,
its loss, and the activations it keeps against what `plan` counts), compiled layers under inductor/Triton
with packing's changing lengths, the in-backward optimizer step compiled by torchao, the throughput meter
without a synchronisation, the peak memory from the start of training. Skipped without a GPU; run by
scripts/gpu_check.sh on a lent GPU machine."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_config
from dolphin_train.config.load import validate_mapping

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LORA = {"adapter": "lora", "lora_target_linear": True, "lora_dropout": 0.0}


def _loaded(cfg: Any) -> tuple[Any, Any]:
    """(model on the GPU as training builds it, runtime)."""
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import load_model
    from dolphin_train.model.tokenizer import load_tokenizer

    runtime = resolve_runtime(cfg)
    torch.manual_seed(0)
    return load_model(cfg, runtime, load_tokenizer(cfg)).to("cuda").train(), runtime


def _batch(length: int = 256) -> dict[str, torch.Tensor]:
    """One packed row of three conversations."""
    cuts = [length // 3, length // 2, length - length // 3 - length // 2]
    ids = torch.randint(3, 2000, (1, length), generator=torch.Generator().manual_seed(length))
    pos = torch.cat([torch.arange(n) for n in cuts])[None]
    return {"input_ids": ids.cuda(), "labels": ids.cuda(), "position_ids": pos.cuda()}


def _saved_bytes(forward: Any, module: Any, x: torch.Tensor) -> int:
    """Bytes autograd keeps for `forward(module, x)`, counted once per storage, parameters and `x` left out."""
    left_out = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in left_out:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(module, x)
    return sum(seen.values())


def _model_own_forward(mlp: Any) -> Any:
    """The transformers MLP class's forward (under the fused subclass, if any)."""
    return next(c for c in type(mlp).__mro__ if not c.__name__.startswith("Fused")).forward


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
@pytest.mark.parametrize("fused_mlp", [True, False], ids=["with lora_mlp_kernel", "without"])
def test_liger_with_and_without_the_fused_lora_mlp(tmp_path: Path, fused_mlp: bool) -> None:
    """Liger applied as the Trainer applies it (`apply_liger_kernel` with `liger_settings`): with
    `lora_mlp_kernel` the fused MLP runs, without it Liger's SwiGLU; either way the loss and LoRA gradients
    of the model without Liger, and the MLP keeps what `plan` counts for it."""
    from transformers.integrations.liger import apply_liger_kernel

    from dolphin_train.plan.trace import use_liger_like_mlps
    from dolphin_train.train.arguments import liger_settings

    cfg = validate_mapping(tiny_config(tmp_path, **LORA, lora_mlp_kernel=fused_mlp, bf16=True))
    model, runtime = _loaded(cfg)
    assert runtime.liger
    reference = copy.deepcopy(model)
    apply_liger_kernel(model, liger_settings(cfg, runtime))
    mlp = model.base_model.model.model.layers[0].mlp
    assert ("forward" in vars(mlp)) is not fused_mlp  # Liger binds its MLP forward on the instance
    losses = []
    for m in (model, reference):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(**_batch()).loss
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in grads:
            error = float((p.grad - grads[name]).norm() / grads[name].norm().clamp_min(1e-12))
            assert error < 5e-2, name
    dtype = mlp.gate_proj.get_base_layer().weight.dtype
    x = torch.randn(1, 256, model.config.hidden_size, device="cuda", dtype=dtype, requires_grad=True)
    kept = _saved_bytes(lambda m, t: m(t), mlp, x)  # what runs: the fused MLP, or Liger's
    assert kept < _saved_bytes(_model_own_forward(mlp), mlp, x)
    if not fused_mlp:  # `plan`'s stand-in for Liger's MLP keeps what Liger's kernel keeps
        stand_in = copy.deepcopy(reference)
        use_liger_like_mlps(stand_in)
        assert _saved_bytes(lambda m, t: m(t), stand_in.base_model.model.model.layers[0].mlp, x) == kept


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_lora_on_the_output_head_trains_under_liger(tmp_path: Path) -> None:
    """Liger's fused loss reads `lm_head.weight`: with LoRA on the head it is turned off, and the head's adapter
    gets its gradient."""
    from dataclasses import replace

    from transformers.integrations.liger import apply_liger_kernel

    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import load_model
    from dolphin_train.model.tokenizer import load_tokenizer
    from dolphin_train.train.arguments import liger_settings

    cfg = validate_mapping(tiny_config(tmp_path, adapter="lora", lora_dropout=0.0, bf16=True,
                                       lora_target_modules=["q_proj", "v_proj", "lm_head"]))  # fmt: skip
    runtime = resolve_runtime(cfg)
    model = load_model(cfg, runtime, replace(load_tokenizer(cfg), new_token_ids=[])).to("cuda").train()
    apply_liger_kernel(model, liger_settings(cfg, runtime))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**_batch()).loss.backward()
    grad = model.base_model.model.lm_head.lora_B["default"].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_compiled_layers_on_packed_rows_of_changing_length(tmp_path: Path) -> None:
    """Inductor generating Triton kernels, lengths marked dynamic: 20 micro batches, each of another length,
    through one graph, with the eager loss."""
    from torch._dynamo.utils import counters

    from dolphin_train.model.load import compile_layers

    cfg = validate_mapping(tiny_config(tmp_path, sample_packing=True, torch_compile=True, bf16=True))
    model, runtime = _loaded(cfg)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(model, cfg, runtime)
    graphs = []
    for i, k in enumerate((11, 5, 13, 2, 20, 7, 16, 3, 9, 18, 1, 14, 6, 19, 10, 4, 17, 12, 8, 15)):
        batch = _batch(8 * k + 3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
            reference = eager(**batch).loss if i < 2 else loss
        loss.backward()
        assert float(loss) == pytest.approx(float(reference), rel=1e-2)
        graphs.append(counters["stats"]["unique_graphs"])
    # Graphs compiled for the first length (one, or more where the attention kernel breaks the graph), none after.
    assert graphs[-1] == graphs[0], f"{graphs} (runtime {runtime.attn_implementation})"


def test_the_compiled_in_backward_step_gives_the_usual_step() -> None:
    """torchao's 8-bit AdamW, compiled, per parameter from the backward pass against the same optimizer's
    usual step on a copy: the same weights after three steps, no gradient left."""
    from torchao.optim import AdamW8bit

    from dolphin_train.train.in_backward import OptimizerInBackward, parameter_optimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512).cuda()
    usual_layer = copy.deepcopy(layer)
    make = parameter_optimizer("adamw_torch_8bit", 1e-2, (0.9, 0.999), 1e-8)
    in_backward = OptimizerInBackward(layer.named_parameters(), make, 1e-2, 0.0, set(), eager=False)
    usual = AdamW8bit(usual_layer.parameters(), lr=1e-2, weight_decay=0.0)
    for x in torch.randn(3, 16, 256, device="cuda"):
        layer(x).square().mean().backward()
        assert all(p.grad is None for p in layer.parameters())
        usual_layer(x).square().mean().backward()
        usual.step()
        usual.zero_grad()
    in_backward.remove_hooks()
    for p, q in zip(layer.parameters(), usual_layer.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_counting_a_micro_batch_never_synchronises() -> None:
    """The throughput meter on a batch on the GPU: CUDA's sync debug mode raises on any synchronising call."""
    from dolphin_train.train.throughput import ModelFlops, ThroughputMeter

    meter = ThroughputMeter(ModelFlops(1000, 200, 900, 2, 32), peak=1e12)
    batch = _batch(1000)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            meter.count_batch(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meter.counted_since_last_log() == (3 * 1000, 3 * (333**2 + 500**2 + 167**2))


def test_peak_memory_is_the_training_s(tmp_path: Path) -> None:
    """A 2 GiB tensor allocated and freed during set-up is not in `peak_memory_mb`."""
    from dolphin_train.recipe import set_up_run
    from dolphin_train.train.outputs import peak_memory_mb

    run = set_up_run(validate_mapping(tiny_config(tmp_path, max_steps=2, micro_batch_size=2, bf16=True)))
    scratch = torch.empty(2**31, dtype=torch.uint8, device="cuda")  # a set-up step's transient peak
    del scratch
    assert peak_memory_mb() >= 2048
    run.trainer.train()
    assert peak_memory_mb() < 2048
