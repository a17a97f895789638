"""The training-side code written for a GPU, run on the CPU through stand-ins: Liger beside the fused LoRA MLP
(issue 22, D5) and beside LoRA on the output head, fp16 with the optimizer step in the backward pass (D6), the
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

The attention kernels (flash-attn, PyTorch's varlen attention) are in tests/test_gpu_paths_on_cpu.py.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.resolve import RuntimeSettings

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


def test_liger_leaves_the_fused_lora_mlp_in_place(tmp_path: Path, stand_in_liger: list[str]) -> None:
    """`lora_mlp_kernel: true` with Liger on (its default on CUDA): the model set-up swaps in the fused MLP,
    then the Trainer applies Liger at the start of `train()` with the settings `liger_settings` chose (as
    `apply_liger_kernel` here). The fused MLP must be what runs: Liger's RMSNorm, RoPE and loss still apply,
    its SwiGLU does not."""
    from transformers.integrations.liger import apply_liger_kernel

    from dolphin_train.train.arguments import liger_settings

    cfg = validate_mapping(tiny_config(tmp_path, **LORA, lora_mlp_kernel=True))
    model = _model_as_training_builds_it(cfg)
    settings = liger_settings(cfg, GPU_WITH_LIGER)
    assert settings is not None  # Liger is applied: its other kernels still run
    apply_liger_kernel(model, settings)
    outputs: list[str] = []
    mlps = [layer.mlp for layer in model.base_model.model.model.layers]
    for mlp in mlps:
        mlp.register_forward_hook(lambda module, args, out: outputs.append(out.grad_fn.name()))
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert stand_in_liger == ["liger fused loss"]  # Liger applied, but not its MLP
    assert outputs == ["FusedLoRAGatedMLPBackward"] * len(mlps)


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


def _packed_batch() -> dict[str, torch.Tensor]:
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
        on_device.count_batch({k: v.to("meta") for k, v in _packed_batch().items()})
    meter = ThroughputMeter(flops, peak=1e12)
    for _ in range(3):
        meter.count_batch(_packed_batch())
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
