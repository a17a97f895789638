"""Compiled decoder layers (`torch_compile`): the same loss and gradients as eager execution, with and
without checkpointing; the first step, which compiles, is timed apart from the throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from transformers import TrainerCallback

from conftest import REPO, tiny_config, write_jsonl
from dolphin_train.config.load import validate_mapping

pytestmark = pytest.mark.slow


class _FirstStep(TrainerCallback):
    grads: ClassVar[dict[str, torch.Tensor]] = {}
    loss: ClassVar[list[float]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not _FirstStep.grads:
            _FirstStep.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(tmp_path: Path, **keys: Any) -> tuple[dict[str, torch.Tensor], list[float], Any]:
    from dolphin_train.recipe import set_up_run

    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:16]]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_steps=2, max_grad_norm=0.0,
                      micro_batch_size=4, sequence_len=512, sample_packing=True, pad_to_sequence_len=True,
                      **keys)  # fmt: skip
    run = set_up_run(validate_mapping(raw))
    _FirstStep.grads = {}
    run.trainer.add_callback(_FirstStep())
    run.trainer.train()
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    return _FirstStep.grads, losses, run


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager layers", "checkpointed layers"])
def test_compiled_layers_give_the_eager_loss_and_gradients(tmp_path: Path, checkpointing: bool) -> None:
    """`aot_eager` traces each layer into the graph the compiler would optimise and runs it without code
    generation: what the regional compilation itself changes, checked in seconds on the CPU."""
    eager_grads, eager_losses, _ = _run(tmp_path / "eager", gradient_checkpointing=checkpointing)
    grads, losses, run = _run(tmp_path / "compiled", gradient_checkpointing=checkpointing, torch_compile=True,
                              torch_compile_backend="aot_eager")  # fmt: skip
    from dolphin_train.model.layers import decoder_layers

    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(run.trainer.model))
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert run.trainer.throughput.first_step_seconds is not None  # timed apart from the steps after it


def test_auto_compiles_on_a_gpu_only(tmp_path: Path) -> None:
    from dataclasses import replace

    from dolphin_train.config.machine import Machine
    from dolphin_train.config.resolve import resolve_runtime

    cfg = validate_mapping(tiny_config(tmp_path, torch_compile="auto"))
    cpu = Machine.planned("cpu", 1)
    assert resolve_runtime(cfg, cpu).compile is False
    assert resolve_runtime(cfg, replace(Machine.planned("cuda", 1))).compile is True


def test_float8_layers_follow_the_plain_loss_in_emulation() -> None:
    """torchao's float8 training, rowwise scaling, emulated on the CPU: the decoder's linear layers convert,
    the head does not, and the loss and its gradients stay close to the plain model's (float8 rounds each
    product's inputs to 3 mantissa bits). The loss curve over a few hundred steps is compared on a GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.model.load import convert_to_float8

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    plain, converted = LlamaForCausalLM(config), LlamaForCausalLM(config)
    converted.load_state_dict(plain.state_dict())
    assert convert_to_float8(converted, emulate=True) == 2 * 7  # q, k, v, o and the three MLP layers
    assert type(converted.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 256, (2, 64))
    losses = [model(input_ids=ids, labels=ids).loss for model in (plain, converted)]
    for loss in losses:
        loss.backward()
    assert float(losses[1]) == pytest.approx(float(losses[0]), rel=1e-2) and float(losses[1]) != float(losses[0])
    grad, reference = converted.model.layers[0].mlp.up_proj.weight.grad, plain.model.layers[0].mlp.up_proj.weight.grad
    assert float((grad - reference).norm() / reference.norm()) < 0.1
