"""bitsandbytes' quantised weights, recognised and read back the same way wherever the code needs the
numbers behind them (the fused LoRA functions, ReLoRA's merges, merge-lora's dequantised base).

bitsandbytes keeps a 4-bit weight in one of two layouts. The standard one (`quantize_4bit`'s codes and a
per-block scale, possibly itself quantised) is what it saves, loads and trains with. On a CPU with AVX-512
BF16 (Xeon Sapphire Rapids, EPYC Zen 4 and later), `Linear4bit.forward` repacks a weight the first time it
runs in eval mode without gradients (`_convert_weight_packed_for_cpu`): the codes reordered for its AVX-512
kernel, the scales transposed into bfloat16, the double quantisation undone, `packing_format_for_cpu` set
on the quantisation state. `dequantize_4bit` does not understand that layout, and the packed kernel has no
backward: a QLoRA run that evaluates on such a CPU would train on with no gradient flowing through the
base layers. So:

- a model that trains keeps the standard layout (`keep_standard_layout`, through the switch each
  `Linear4bit` reads, `support_avx512bf16_for_cpu`);
- a reader meets either layout: a packed weight is put back into the standard layout first, by
  bitsandbytes' own inverse, as bitsandbytes itself does before saving a packed weight or moving it to a GPU.
"""

from __future__ import annotations

from typing import Any

import torch


def is_4bit(weight: Any) -> bool:
    return type(weight).__name__ == "Params4bit"


def is_8bit(weight: Any) -> bool:
    return type(weight).__name__ == "Int8Params"


def is_cpu_packed(weight: Any) -> bool:
    """A 4-bit weight in bitsandbytes' AVX-512 BF16 CPU layout."""
    return is_4bit(weight) and bool(getattr(weight.quant_state, "packing_format_for_cpu", False))


def to_standard_layout(weight: Any) -> None:
    """Put a CPU-packed 4-bit weight back into the standard layout, in place (a no-op for any other weight).

    bitsandbytes' inverse (the one its `Linear4bit` uses before saving) restores the codes, the dtype and a
    double-quantised scale; without double quantisation (bitsandbytes 0.50) it leaves the block scales as the
    packed layout holds them, transposed to (blocks per row, rows), which `dequantize_4bit` would read in the
    wrong order. Those are put back row by row here; a release that restores them itself gives a 1-D tensor,
    which is left as it is. The scales stay as the packed kernel used them (rounded to bfloat16)."""
    if not is_cpu_packed(weight):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).float().contiguous()
    weight.data = data
    weight.quant_state = state
    module = getattr(weight, "module", None)
    if module is not None and getattr(module, "quant_state", None) is not None:
        module.quant_state = state  # Linear4bit keeps its own reference, refreshed from the weight's


def dequantized(weight: Any) -> torch.Tensor:
    """The values a weight stands for: a 4-bit weight dequantised by bitsandbytes (in its quantisation
    state's dtype) whichever layout it is in, any other weight's data as it is."""
    if not is_4bit(weight):
        return weight.data
    import bitsandbytes.functional as bnbf

    to_standard_layout(weight)
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def four_bit_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that own a 4-bit weight (not the wrappers, such as peft's LoRA layers, that pass
    their base layer's weight through)."""
    return [module for module in model.modules() if is_4bit(dict(module.named_parameters(recurse=False)).get("weight"))]


def keep_standard_layout(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer of a model that trains in the standard layout, on any CPU: an evaluation pass
    must not leave weights that the backward pass and our readers cannot use. Returns the layers set."""
    layers = four_bit_linears(model)
    for module in layers:
        to_standard_layout(module.weight)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return len(layers)


def dequantized_model(model: Any) -> Any:
    """transformers' `dequantize()` of a 4-bit model (which reads the standard layout only), whatever layout
    each weight is in."""
    for module in four_bit_linears(model):
        to_standard_layout(module.weight)
    return model.dequantize()
