"""Which implementation of a patched part of the model runs: decided here once, and read by the model set-up,
by Liger's settings (train/arguments.py) and by `plan`, so that the plan counts what training runs.

Two things replace the forward of a gated MLP: the fused LoRA MLP (`lora_mlp_kernel`, model/lora_kernels.py),
which gives each LoRA-adapted MLP a subclass at the model's set-up, and Liger's SwiGLU/GeGLU kernel, which the
Trainer applies at the start of `train()` by binding its forward onto each MLP *instance* (liger-kernel's
`_patch_swiglu_module`). An instance's own `forward` wins over its class's, so Liger applied after the swap
would silently run its MLP instead of the fused one. The rule:
- `lora_mlp_kernel: true` names the fused MLP; Liger's MLP kernel is on only by default (its apply functions
  default `swiglu`/`geglu` to true), so the fused MLP wins and Liger is told to leave the MLP alone. Its other
  kernels (RMSNorm, RoPE, the fused loss) still apply. Asking for both by name is refused at load.
- `tiled_mlp: true` (model/tiled_mlp.py) runs the MLP's class forward (the model's own or the fused one)
  over chunks of the sequence, also through a subclass: Liger's MLP would replace it the same way, so it
  leaves the MLP alone then too (a chunk's intermediates are small: what Liger's MLP saves, tiling already
  has). Asking for both by name is refused at load;
- otherwise, with Liger applied and its GLU kernel not turned off, Liger's MLP runs;
- otherwise the model's own.
"""

from __future__ import annotations

from enum import Enum

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config


class MlpForward(Enum):
    FUSED_LORA = "the fused LoRA MLP (lora_mlp_kernel)"
    LIGER = "Liger's SwiGLU/GeGLU kernel"
    PLAIN = "the model's own"


def use_liger(cfg: Config, runtime: RuntimeSettings) -> bool:
    """Liger's kernels where `liger_kernel` allows them and liger-kernel is installed on CUDA (applied by
    transformers' `use_liger_kernel`); its fused linear cross-entropy never materialises the full logits
    either. The `liger_*` keys (axolotl's LigerPlugin settings) pick the kernels."""
    return cfg.liger_kernel and runtime.liger


def fused_lora_mlp(cfg: Config) -> bool:
    """The fused LoRA MLP is swapped in: it does not depend on the machine (it runs wherever peft does)."""
    return bool(cfg.adapter and cfg.lora_mlp_kernel)


def mlp_forward(cfg: Config, runtime: RuntimeSettings) -> MlpForward:
    """The forward each gated MLP runs in training (see the module docstring for the precedence)."""
    if fused_lora_mlp(cfg):
        return MlpForward.FUSED_LORA
    if use_liger(cfg, runtime) and cfg.liger_kernel_config.get("swiglu", True) and cfg.tiled_mlp is not True:
        return MlpForward.LIGER
    return MlpForward.PLAIN


def liger_rms_norm(cfg: Config, runtime: RuntimeSettings) -> bool:
    """Liger's RMSNorm replaces the model's (its apply functions default `rms_norm` to true): it keeps its
    input and one float32 scale per token for the backward pass, not a float32 copy of the input."""
    return use_liger(cfg, runtime) and cfg.liger_kernel_config.get("rms_norm", True)


def liger_mlp_settings(choice: MlpForward) -> dict[str, bool]:
    """What Liger's settings add so that Liger patches the MLP exactly when it was chosen."""
    return {} if choice is MlpForward.LIGER else {"swiglu": False, "geglu": False}
