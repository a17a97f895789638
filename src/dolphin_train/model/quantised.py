"""bitsandbytes' quantised weights, recognised and read back the same way wherever the code needs the
numbers behind them (the fused LoRA functions, ReLoRA's merges)."""

from __future__ import annotations

from typing import Any

import torch


def is_4bit(weight: Any) -> bool:
    return type(weight).__name__ == "Params4bit"


def is_8bit(weight: Any) -> bool:
    return type(weight).__name__ == "Int8Params"


def dequantized(weight: Any) -> torch.Tensor:
    """The values a weight stands for: a 4-bit weight dequantised by bitsandbytes (in its quantisation
    state's dtype), any other weight's data as it is."""
    if not is_4bit(weight):
        return weight.data
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state)
