"""Float8 weight scales for FSDP2's float8 all-gather (`fp8_enable_fsdp_float8_all_gather`).

With the all-gather in float8, each shard is cast before the gather, with a scale from the whole weight's
largest value. torchao's `precompute_float8_dynamic_scale_for_fsdp` computes every weight's scale in one
all-reduce after the optimizer step (the weights change only then); without it each weight's cast reduces
its own maximum across the processes, one collective per layer per forward pass.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class Float8ScalesForFsdp(TrainerCallback):
    """After each optimizer step, the scales of the FSDP2-sharded float8 weights, in one all-reduce."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        if model is not None:
            precompute_float8_dynamic_scale_for_fsdp(model)
