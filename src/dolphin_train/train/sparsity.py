"""Sparse fine-tuning (`llmcompressor:`, axolotl's LLM Compressor plugin): the zeros of a sparse model's
targeted weights stay zero for the whole run.

LLM Compressor's ConstantPruningModifier keeps a mask per weight in the weight's dtype (2 bytes a value in
bf16: 14 GB for Llama-3-8B's linear layers) and multiplies the weight by it after every optimizer step. Here
the mask is packed to one bit a value (0.9 GB), weights at most 1e-8 in magnitude (its threshold for "zero")
are set to exactly 0 once, each pruned value's gradient is zeroed as soon as it is accumulated (so gradient
clipping measures the gradient of the weights that train, and float32 Adam's moments of the pruned values stay
zero), and the pruned values are set back to 0 after every optimizer step (8-bit optimizer states do move a
value whose gradient is zero: their quantised zero is not exactly zero).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)

ZERO = 1e-8  # LLM Compressor's threshold: weights at most this large are pruned ones


def target_matches(name: str, target: str) -> bool:
    """LLM Compressor's matching: `re:` + a regular expression matched from the start, else the exact name."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else name == target


def targeted_parameters(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    found = {n: p for n, p in model.named_parameters() if any(target_matches(n, t) for t in targets)}
    if not found:
        example = next(n for n, _ in model.named_parameters() if n.endswith(".weight"))
        raise DolphinError(f"llmcompressor: no parameter of the model matches the recipe's targets "
                           f"({', '.join(targets)}); names look like '{example}'")  # fmt: skip
    return found


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as one bit a value (uint8, 8 values a byte)."""
    flat = mask.flatten()
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)])
    weights = 2 ** torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.flatten()[: shape.numel()].view(shape).bool()


class KeepZeros(TrainerCallback):
    """Holds the targeted weights' zeros at zero (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, targets: tuple[str, ...]) -> None:
        self.params = targeted_parameters(model, targets)
        with torch.no_grad():
            for p in self.params.values():
                p.masked_fill_(p.abs() <= ZERO, 0)
        self.kept = {name: pack_bits(p != 0) for name, p in self.params.items()}
        self.zeros_at_start = self.count_zeros()
        self.total = sum(p.numel() for p in self.params.values())
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(self._gradient_hook(name))
        log.info("Sparse fine-tuning: the zeros of %d weight tensors (%.1f%% of their %s values) stay zero",
                 len(self.params), 100 * self.zeros_at_start / max(1, self.total), f"{self.total:,}")  # fmt: skip

    def kept_mask(self, name: str) -> torch.Tensor:
        param = self.params[name]
        return unpack_bits(self.kept[name].to(param.device), param.shape)

    def _gradient_hook(self, name: str) -> Any:
        def zero_pruned_gradient(param: torch.Tensor) -> None:
            if param.grad is not None:
                param.grad.masked_fill_(~self.kept_mask(name), 0)

        return zero_pruned_gradient

    @torch.no_grad()
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for name, param in self.params.items():
            param.masked_fill_(~self.kept_mask(name), 0)

    def count_zeros(self) -> int:
        return sum(int((p == 0).sum()) for p in self.params.values())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        log.info("Sparse fine-tuning: %s zeros at the start, %s at the end", f"{self.zeros_at_start:,}",
                 f"{self.count_zeros():,}")  # fmt: skip


def save_recipe(output_dir: str, sparse: Any) -> None:
    """The recipe next to the model as `recipe.yaml`, where LLM Compressor's save writes it."""
    import yaml

    Path(output_dir, "recipe.yaml").write_text(yaml.safe_dump(sparse.recipe, sort_keys=False))
    if sparse.save_compressed:
        log.info("save_compressed: compressed-tensors has no sparse storage format any more; the model is saved "
                 "dense (safetensors), as LLM Compressor saves a sparse model today")  # fmt: skip
