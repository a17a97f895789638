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
