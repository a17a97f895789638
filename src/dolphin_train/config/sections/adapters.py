"""The adapter keys: LoRA and its variants (DoRA, rsLoRA, LoftQ), and the fused LoRA kernels."""

from __future__ import annotations

import re
from typing import Literal

from dolphin_train.config.keys import Section, Strict, key


class LoftQSettings(Strict):
    """`peft.loftq_config:` LoftQ initialisation of a new LoRA adapter."""

    loftq_bits: Literal[4, 8] = key(
        4,
        "LoftQ: start a new LoRA adapter (`adapter: lora`) over the base quantised to this many bits (4: NF4, "
        "8: row-wise int8, bitsandbytes' quantisers), with the adapter initialised so that quantised base + "
        "adapter is close to the original weights. The quantised base is what trains (kept in the compute "
        "dtype) and is saved next to the adapter (`loftq_base.safetensors`), which `merge-lora` and `chat` use.",
        "model",
    )
    loftq_iter: int = key(
        1,
        "LoftQ's alternating rounds (quantise, then fit the low-rank correction to what quantisation missed); "
        "peft's `loftq_iter`.",
        "model",
        ge=1,
        le=20,
    )


class PeftSettings(Strict):
    """`peft:` axolotl's extra peft settings."""

    loftq_config: LoftQSettings | None = key(
        None, "LoftQ initialisation of the adapter (the `peft.loftq_config.*` keys).", "model"
    )  # fmt: skip


class AdapterKeys(Section):
    """The adapter trained instead of all the weights, its rank, targets and variants."""

    adapter: Literal["lora", "qlora"] | None = key(
        None,
        "Train a LoRA adapter (`lora`) or a LoRA over 4-bit base weights (`qlora`) instead of all weights.",
        "model",
    )
    lora_r: int = key(8, "LoRA rank.", "model", ge=1)
    lora_alpha: int = key(16, "LoRA scaling numerator (the update is scaled by alpha / r).", "model", ge=1)
    lora_dropout: float = key(0.0, "Dropout on the LoRA input.", "model", ge=0, lt=1)
    lora_target_modules: list[str] | str | None = key(
        None,
        "Module names LoRA adapts (e.g. `[q_proj, v_proj]`), or one regular expression over full module names "
        "(as peft reads a string, e.g. `model.layers.[0-9]+.self_attn.(q|v)_proj`); default every linear layer.",
        "model",
    )
    lora_target_linear: bool | None = key(
        None,
        "Adapt every linear layer except the output head (the default when no modules are named; with "
        "`lora_target_modules` too, as in axolotl, the union: every linear layer); `false` requires "
        "`lora_target_modules`.",
        "model",
    )
    lora_modules_to_save: list[str] | None = key(
        None,
        "Modules trained in full next to the adapter. When tokens are added, the input and output embeddings "
        "are added automatically; a list without them is rejected then, since the new rows would stay untrained.",
        "model",
    )
    lora_model_dir: str | None = key(None, "Continue training from this saved adapter.", "model")
    peft_use_dora: bool = key(False, "DoRA: weight-decomposed LoRA.", "model")
    peft_use_rslora: bool = key(False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.", "model")
    lora_fan_in_fan_out: bool | None = key(
        None,
        "peft's `fan_in_fan_out`: the adapted layers store their weight as (in, out), as GPT-2's Conv1D layers "
        "do. Passed to peft, which sets it from each layer's type anyway (and warns when the value disagrees).",
        "model",
    )
    peft: PeftSettings | None = key(
        None, "axolotl's extra peft settings: `loftq_config` (below).", "model"
    )  # fmt: skip

    @property
    def loftq(self) -> LoftQSettings | None:
        """LoftQ's settings when a new adapter starts with it (`peft.loftq_config`), else None."""
        return self.peft.loftq_config if self.peft else None

    @property
    def lora_targets(self) -> list[str] | str:
        """The modules LoRA adapts: those named (a list, or peft's regular expression), else every linear
        layer but the head (peft's `all-linear`); as in axolotl, `lora_target_linear: true` adds every linear
        layer to those named, so their union is all of them."""
        if self.lora_target_linear or not self.lora_target_modules:
            return "all-linear"
        return self.lora_target_modules

    @property
    def adapts_output_head(self) -> bool:
        """LoRA on the output head (named in `lora_target_modules`; peft's all-linear leaves it out): its
        logits go through the adapter, which the chunked loss does not reproduce."""
        return bool(self.adapter) and self.names_output_head

    @property
    def names_output_head(self) -> bool:
        """`lm_head` among `lora_target_modules` (or matched by its regular expression)."""
        targets = self.lora_target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, "lm_head") is not None
        return "lm_head" in (targets or [])


class LoRAKernelKeys(Section):
    """Fused functions for the LoRA-adapted projections. A class apart from `AdapterKeys` for the reference's
    order only: these keys follow the compat keys in the `model` table."""

    lora_mlp_kernel: bool = key(
        False,
        "Run each LoRA-adapted gated MLP (Llama, Mistral, Qwen, Gemma) as one fused function that keeps half the "
        "activations the plain one keeps for the backward pass (same values and gradients; checked against the "
        "model's own MLP before training). Needs `lora_dropout: 0`. Where Liger's kernels apply, it runs in place "
        "of Liger's SwiGLU/GeGLU (Liger's other kernels still apply).",
        "model",
    )
    lora_qkv_kernel: bool = key(
        False,
        "Compute each LoRA-adapted q/k/v projection (base and LoRA) as one fused function that keeps only its "
        "input and the rank-sized LoRA intermediate. Needs `lora_dropout: 0`.",
        "model",
    )
    lora_o_kernel: bool = key(
        False, "As `lora_qkv_kernel`, for the attention's output projection (`o_proj`).", "model"
    )

    @property
    def lora_kernels(self) -> list[str]:
        return [k for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel") if getattr(self, k)]
