"""bitsandbytes' 4-bit weights read back in both of its layouts, on any CPU.

bitsandbytes repacks a 4-bit weight into an AVX-512 BF16 layout the first time a `Linear4bit` runs in eval
mode without gradients on a CPU that has that instruction set. These tests never rely on the CPU they run
on: they repack explicitly with bitsandbytes' own conversion (pure tensor code, it runs on any CPU) and
never run a forward pass through a packed weight (its kernel needs AVX-512 BF16)."""

from __future__ import annotations

import pytest
import torch

from dolphin_train.model.quantised import (
    dequantized,
    is_cpu_packed,
    keep_standard_layout,
    to_standard_layout,
)

LAYOUTS = [(nested, storage) for nested in (False, True) for storage in (torch.uint8, torch.bfloat16)]


def linear_4bit(nested: bool, storage: torch.dtype, out_features: int = 64, in_features: int = 128):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.nn.Linear(in_features, out_features, bias=False).weight.data
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type="nf4", quant_storage=storage)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=nested, quant_type="nf4",
                                     quant_storage=storage, module=layer)  # fmt: skip
    return layer.to("cpu")


def repack_for_cpu(layer) -> None:
    """What `Linear4bit.forward` does to its weight on an AVX-512 BF16 CPU in eval mode without gradients."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )


@pytest.mark.parametrize(("nested", "storage"), LAYOUTS)
def test_a_cpu_packed_weight_reads_as_the_standard_one(nested: bool, storage: torch.dtype) -> None:
    import bitsandbytes.functional as bnbf

    layer = linear_4bit(nested, storage)
    standard = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    repack_for_cpu(layer)
    assert is_cpu_packed(layer.weight)
    read = dequantized(layer.weight).float()
    assert read.shape == standard.shape
    # The packed layout keeps the block scales in bfloat16 (and a double-quantised scale is quantised
    # again on the way back): the values may move by that rounding, not by a misread block (~6% of the
    # largest value with bitsandbytes 0.50's inverse alone, without double quantisation).
    assert (read - standard).abs().max() <= standard.abs().max() * 2**-7
    assert not is_cpu_packed(layer.weight)


def test_keep_standard_layout_restores_a_packed_weight_and_turns_repacking_off() -> None:
    layer = linear_4bit(nested=True, storage=torch.uint8)
    model = torch.nn.Sequential(layer)
    repack_for_cpu(layer)
    assert keep_standard_layout(model) == 1
    assert not is_cpu_packed(layer.weight) and layer.quant_state is layer.weight.quant_state
    assert layer.support_avx512bf16_for_cpu is False
    # An evaluation pass then leaves the layout as it is, on any CPU, and training gets its gradients.
    x = torch.randn(3, 128)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert not is_cpu_packed(layer.weight)
    layer.train()
    x.requires_grad_(True)
    layer(x).sum().backward()
    expected = dequantized(layer.weight).float().sum(0).expand(3, -1)
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_a_standard_weight_is_left_as_it_is() -> None:
    layer = linear_4bit(nested=False, storage=torch.uint8)
    pointer, state = layer.weight.data_ptr(), layer.weight.quant_state
    to_standard_layout(layer.weight)
    assert layer.weight.data_ptr() == pointer and layer.weight.quant_state is state
