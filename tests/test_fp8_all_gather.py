"""`fp8_enable_fsdp_float8_all_gather`: torchao's float8 training set up for FSDP2 to gather float8 weights
(tensorwise scaling, the weights wrapped for the float8 cast before the gather). What is checked here is the
configuration and the converted layers (emulated float8 on the CPU); the speed-up is an FSDP2 run on several
float8 GPUs, which these tests cannot measure."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError

pytest.importorskip("torchao")

FSDP2 = {"fsdp_version": 2, "fsdp_config": {"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}
BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}


def test_all_gather_config_is_tensorwise_with_fsdp_float8_all_gather() -> None:
    from torchao.float8.config import ScalingGranularity

    from dolphin_train.model.load import float8_config

    gather = float8_config(fsdp_float8_all_gather=True)
    assert gather.enable_fsdp_float8_all_gather is True
    for cast in (gather.cast_config_input, gather.cast_config_weight, gather.cast_config_grad_output):
        assert cast.scaling_granularity is ScalingGranularity.TENSORWISE
    plain = float8_config()
    assert plain.enable_fsdp_float8_all_gather is False
    assert plain.cast_config_weight.scaling_granularity is ScalingGranularity.AXISWISE  # rowwise, the default


def test_converted_weights_are_ready_for_the_float8_all_gather() -> None:
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.model.load import convert_to_float8

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert convert_to_float8(model, emulate=True, fsdp_float8_all_gather=True) == 7
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, Float8Linear) and layer.config.enable_fsdp_float8_all_gather
    assert isinstance(layer.weight, WeightWithDynamicFloat8CastTensor)  # FSDP2 casts it to float8 before gathering
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 256, (2, 32))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.weight.grad is not None


def test_the_example_config_keys_validate() -> None:
    cfg = validate_mapping({**BASE, **FSDP2, "fp8": True, "fp8_enable_fsdp_float8_all_gather": True})
    assert cfg.fp8_enable_fsdp_float8_all_gather


@pytest.mark.parametrize(
    "keys",
    [
        {**FSDP2},  # no fp8
        {"fp8": True},  # no FSDP
        {"fp8": True, "fsdp_version": 1, "fsdp_config": {"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}},
    ],
)
def test_refused_without_fp8_and_fsdp2(keys: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="needs fp8: true and FSDP2"):
        validate_mapping({**BASE, **keys, "fp8_enable_fsdp_float8_all_gather": True})


def test_fsdp2_gathers_float8_weights_on_the_cpu(tmp_path: Any) -> None:
    """One process over gloo: FSDP2 shards the converted layers and gathers them in float8 (emulated), with the
    loss of the same float8 layers unsharded; after an optimizer step the callback precomputes each weight's
    scale, as torchao's float8 cast would compute it (float8's largest value / the weight's largest value)."""
    import dataclasses

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.model.load import convert_to_float8, float8_config
    from dolphin_train.train.float8_scales import Float8ScalesForFsdp

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    reference, sharded = LlamaForCausalLM(config), LlamaForCausalLM(config)
    sharded.load_state_dict(reference.state_dict())
    same_recipe = dataclasses.replace(float8_config(True, emulate=True), enable_fsdp_float8_all_gather=False)
    convert_to_float8_training(reference, config=same_recipe, module_filter_fn=lambda m, n: "lm_head" not in n)
    convert_to_float8(sharded, emulate=True, fsdp_float8_all_gather=True)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        weight = sharded.model.layers[0].mlp.up_proj.weight
        assert isinstance(weight._local_tensor, WeightWithDynamicFloat8CastTensor)  # FSDP2 calls its float8 cast
        ids = torch.randint(0, 256, (2, 32))
        loss = sharded(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids).loss, rtol=1e-6, atol=1e-6)
        loss.backward()
        torch.optim.SGD(sharded.parameters(), lr=0.1).step()
        Float8ScalesForFsdp().on_optimizer_step(None, None, None, model=sharded)
        expected = torch.finfo(torch.float8_e4m3fn).max / weight.full_tensor().abs().max().double()
        assert float(weight._local_tensor._precomputed_scale) == pytest.approx(float(expected), rel=1e-6)
    finally:
        dist.destroy_process_group()
