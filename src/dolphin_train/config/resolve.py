"""Values derived from the config and this machine (`auto` precision, attention backend, launcher).

They live here, not in the Config, so the Config stays exactly what the user wrote (plus defaults).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass

from dolphin_train.config.schema import Config
from dolphin_train.errors import EnvironmentProblem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeSettings:
    device: str  # "cuda" or "cpu"
    bf16: bool
    fp16: bool
    tf32: bool
    attn_implementation: str
    attention_note: str  # why this backend was chosen, logged at start
    world_size: int
    launcher: str  # "single process", "torchrun/accelerate (N processes)"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints, logs and writes summaries."""
    return os.environ.get("RANK", "0") == "0"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _tf32_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve_attention(cfg: Config, cuda: bool) -> tuple[str, str]:
    """Pick the attention backend. Packed rows stay exact with every choice: flash-attn and transformers'
    SDPA path both derive sequence boundaries from the restarting position ids."""
    if cfg.attn_implementation:
        return cfg.attention_backend, "set by attn_implementation"
    flash = cfg.flash_attention or cfg.attention == "flash"  # axolotl's `attention: flash`: the best flash path
    if cfg.attention and not flash:
        return cfg.attention_backend, "set by attention"
    if flash:
        if cuda and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2", "flash_attention: true and flash-attn is installed"
        if cuda:
            from dolphin_train.model.attention import VARLEN, torch_varlen_available

            if torch_varlen_available():
                return VARLEN, "flash_attention: true, flash-attn not installed: PyTorch's varlen flash attention"
        reason = "no CUDA device" if not cuda else "neither flash-attn nor PyTorch varlen attention is available"
        return "sdpa", f"flash_attention: true, but {reason}: using PyTorch SDPA (block-diagonal mask when packed)"
    return "sdpa", "PyTorch SDPA (block-diagonal mask when packed)"


def resolve_runtime(cfg: Config) -> RuntimeSettings:
    cuda = _cuda_available()
    bf16 = _bf16_supported() if cfg.bf16 == "auto" else bool(cfg.bf16)
    fp16 = bool(cfg.fp16) and not bf16
    tf32 = _tf32_supported() if cfg.tf32 == "auto" else bool(cfg.tf32)
    if fp16 and not cuda:
        raise EnvironmentProblem("fp16: true needs a CUDA GPU; use bf16 (or neither) on the CPU")
    if cfg.tf32 is True and not _tf32_supported():
        raise EnvironmentProblem("tf32: true needs an Ampere or newer NVIDIA GPU; set tf32: auto or false")
    attn, note = resolve_attention(cfg, cuda)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = "single process" if world_size == 1 else f"distributed ({world_size} processes)"
    return RuntimeSettings(
        device="cuda" if cuda else "cpu",
        bf16=bf16,
        fp16=fp16,
        tf32=tf32,
        attn_implementation=attn,
        attention_note=note,
        world_size=world_size,
        launcher=launcher,
    )


def resolved_settings(cfg: Config, runtime: RuntimeSettings) -> dict:
    """The config as it runs here: every key with its default filled in and `auto` precision resolved.
    What `validate` prints, what training saves next to the model and hands to wandb."""
    resolved = cfg.model_dump(mode="json", by_alias=True)
    resolved.update(bf16=runtime.bf16, fp16=runtime.fp16, tf32=runtime.tf32)
    return resolved
