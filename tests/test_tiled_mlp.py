"""Tiled MLP (`tiled_mlp`): the same values and gradients as the plain MLP, and activations kept that scale
with a chunk of the sequence, not with the sequence."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError
from dolphin_train.model.lora_kernels import use_fused_lora
from dolphin_train.model.tiled_mlp import use_tiled_mlp
from test_lora_kernels import lora_model, saved_bytes


def full_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)  # fmt: skip
    return LlamaForCausalLM(config)


def loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, tiled, ids: torch.Tensor, expected_grads: int) -> None:
    loss, grads = loss_and_grads(plain, ids)
    tiled_loss, tiled_grads = loss_and_grads(tiled, ids)
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == tiled_grads.keys() and len(grads) == expected_grads
    for name, grad in grads.items():  # the chunks' parameter gradients are summed in another order
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


IDS = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shards", [2, 5])
def test_tiled_mlp_gives_the_plain_values_and_gradients_in_full_fine_tuning(shards: int) -> None:
    plain = full_model()
    tiled = copy.deepcopy(plain)
    assert use_tiled_mlp(tiled, shards) == 2
    assert type(tiled.model.layers[0].mlp).__name__ == "TiledLlamaMLP"
    assert_same(plain, tiled, IDS, expected_grads=len(list(plain.parameters())))


def test_tiled_mlp_over_lora_and_the_fused_lora_mlp() -> None:
    plain = lora_model()
    for fused in (False, True):
        tiled = copy.deepcopy(plain)
        if fused:
            use_fused_lora(tiled, mlp=True, qkv=False, o=False)
        use_tiled_mlp(tiled, 3)
        assert type(tiled.base_model.model.model.layers[0].mlp).__name__ == ("TiledFusedLlamaMLP" if fused
                                                                              else "TiledLlamaMLP")  # fmt: skip
        plain.zero_grad()
        assert_same(plain, tiled, IDS, expected_grads=2 * 2 * 7)


def test_lora_dropout_draws_the_same_masks_in_the_recomputation() -> None:
    """With dropout, the reference is the plain MLP applied chunk by chunk from the same random state: the
    gradients must be those of the very masks the forward pass drew."""
    import peft

    def model():
        base = full_model()
        for p in base.parameters():
            p.requires_grad_(False)
        settings = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                                   lora_dropout=0.3, init_lora_weights=False)  # fmt: skip
        return peft.get_peft_model(base, settings)

    tiled, plain = model(), model()
    use_tiled_mlp(tiled, 4)
    mlp_class = type(plain.base_model.model.model.layers[0].mlp)
    chunked = type("Chunked", (mlp_class,), {"forward": lambda self, x: torch.cat(
        [mlp_class.forward(self, c) for c in x.chunk(4, dim=-2)], dim=-2)})  # fmt: skip
    for layer in plain.base_model.model.model.layers:
        layer.mlp.__class__ = chunked
    torch.manual_seed(7)
    loss, grads = loss_and_grads(plain, IDS)
    torch.manual_seed(7)
    tiled_loss, tiled_grads = loss_and_grads(tiled, IDS)
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_tiled_mlp_keeps_its_input_only() -> None:
    model = full_model()
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 512, 64, requires_grad=True)
    plain = saved_bytes(mlp, x)
    use_tiled_mlp(model, 8)
    tiled = saved_bytes(model.model.layers[0].mlp, x)
    assert tiled == x.numel() * 4  # the input, nothing of the 160-wide intermediates
    assert plain >= 3 * 512 * 160 * 4  # the plain MLP keeps gate, up and their product (at least)


def test_tiled_mlp_keys_are_checked(tmp_path: Path) -> None:
    cfg = validate_mapping(tiny_config(tmp_path, tiled_mlp=True, tiled_mlp_num_shards=4))
    assert cfg.tiled_mlp is True and cfg.tiled_mlp_num_shards == 4
    assert validate_mapping(tiny_config(tmp_path, tiled_mlp="auto")).has_auto_memory_settings
    with pytest.raises(ConfigError, match="tiled_mlp_num_shards sets the chunks"):
        validate_mapping(tiny_config(tmp_path, tiled_mlp_num_shards=4))


def test_what_the_tiled_mlp_cannot_run_with_is_refused_and_auto_does_not_try_it(tmp_path: Path) -> None:
    """Liger's MLP named too (both replace the MLP's forward), and FSDP1 (it computes with views of its flat
    parameter, whose gradients the tiled function would not take). `auto` then leaves the MLP untiled."""
    from dolphin_train.plan.auto import _candidates

    fsdp1 = {"fsdp": ["full_shard", "auto_wrap"], "fsdp_version": 1}
    with pytest.raises(ConfigError, match="tiled_mlp: true and liger_glu_activation: true"):
        validate_mapping(tiny_config(tmp_path, tiled_mlp=True, liger_glu_activation=True))
    with pytest.raises(ConfigError, match="tiled_mlp with FSDP1"):
        validate_mapping(tiny_config(tmp_path, tiled_mlp=True, **fsdp1))
    fsdp2 = {"fsdp": ["full_shard", "auto_wrap"]}
    for keys, tiling in ((fsdp1, {False}), ({"liger_glu_activation": True}, {False}), (fsdp2, {False, True}),
                         ({"deepspeed": "deepspeed_configs/zero3.json"}, {False, True})):  # fmt: skip
        cfg = validate_mapping(tiny_config(tmp_path, tiled_mlp="auto", micro_batch_size=1, **keys))
        assert {c["tiled_mlp"] for c in _candidates(cfg, rows=None)} == tiling, keys


def test_compiled_layers_run_the_tiled_mlp_eagerly_with_the_plain_gradients(tmp_path: Path) -> None:
    """`torch_compile`: each decoder layer compiled (`compile_layers`) around the tiled MLP, which dynamo
    cannot trace (the random state's replay, the backward's own autograd calls): the layer breaks its graph
    there and nowhere else, gives the plain model's values and gradients, and rows of other lengths compile
    nothing new. The aot_eager backend: the graph capture is what is tested here (inductor's code generation
    for the layers is tested in test_gpu_paths_on_cpu.py)."""
    from torch._dynamo.utils import counters

    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import compile_layers

    cfg = validate_mapping(tiny_config(tmp_path, torch_compile=True, torch_compile_backend="aot_eager"))
    plain = full_model()
    tiled = copy.deepcopy(plain)
    use_tiled_mlp(tiled, 3)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(tiled, cfg, resolve_runtime(cfg))
    assert_same(plain, tiled, IDS, expected_grads=len(list(plain.parameters())))
    breaks = counters["graph_break"]
    assert breaks and all("tiled_mlp" in reason for reason in breaks), list(breaks)
    graphs = counters["stats"]["unique_graphs"]
    for length in (40, 24, 56):
        ids = IDS[:, :length]
        tiled(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]


def test_a_run_with_tiled_mlp_and_checkpointing_takes_the_plain_gradients(tmp_path: Path) -> None:
    """Through training's own model loading (`tiled_mlp: true`), under non-reentrant checkpointing, whose
    recomputation runs the tiled function again inside the backward pass."""
    from test_memory_modes import _first_step_gradients

    kwargs = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    plain = _first_step_gradients(tmp_path / "plain", **kwargs)
    tiled = _first_step_gradients(tmp_path / "tiled", tiled_mlp=True, tiled_mlp_num_shards=3, **kwargs)
    assert plain.keys() == tiled.keys() and plain
    for name in plain:
        torch.testing.assert_close(tiled[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
