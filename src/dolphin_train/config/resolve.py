"""Values derived from the config and the machine (`auto` precision, attention backend, launcher).

They live here, not in the Config, so the Config stays exactly what the user wrote (plus defaults).
Training resolves them for the machine it finds; `dolphin-train plan` for the machine it plans for.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from dolphin_train.config.machine import Machine
from dolphin_train.config.schema import Config
from dolphin_train.errors import EnvironmentProblem

log = logging.getLogger(__name__)

# Our variable-length attention entry point (model/attention.py) with each kernel: PyTorch's varlen flash
# attention, flash-attn 2, flash-attn 3. transformers' own `flash_attention_2/3` names are read as these: its
# flash path keeps packed rows apart only at micro batch size 1. (No "flash" in the names: transformers gives
# names holding it flash-specific treatment, such as loading a hub kernel.)
VARLEN = "dolphin_varlen"
FA2_VARLEN = "dolphin_fa2_varlen"
FA3_VARLEN = "dolphin_fa3_varlen"
SDPA_VARLEN = "dolphin_sdpa_varlen"  # PyTorch SDPA as the kernel: any device, what a kernel lacking a window falls to
OUR_FLASH = {"flash_attention_2": FA2_VARLEN, "flash_attention_3": FA3_VARLEN}
OUR_BACKENDS = (VARLEN, FA2_VARLEN, FA3_VARLEN, SDPA_VARLEN)  # the ones running our varlen entry point
# `gemma4_hybrid_attn_impl`: flash-attn for sliding-window layers, SDPA for global ones (model/attention.py)
HYBRID = "dolphin_gemma4_hybrid"

# transformers' flex attention compiled with `flex_attn_compile_kwargs` (model/attention.py); the name holds
# "flex_attention" so that transformers runs its flex-attention support checks and builds the flex block mask.
FLEX_COMPILED = "dolphin_flex_attention"


@dataclass(frozen=True)
class RuntimeSettings:
    device: str  # "cuda" or "cpu"
    bf16: bool
    fp16: bool
    tf32: bool
    attn_implementation: str
    attention_note: str  # why this backend was chosen, logged at start
    world_size: int
    launcher: str  # "single process", "distributed (N processes)"
    liger: bool = False  # Liger's fused kernels usable (liger-kernel installed, CUDA)
    compile: bool = False  # decoder layers compiled with torch.compile (`torch_compile`, `auto` on CUDA)

    @property
    def precision(self) -> str:
        """"bf16", "fp16" or "fp32": the dtype of the matrix products."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


XFORMERS_NOTE = (
    "xformers asked for: PyTorch SDPA, whose memory-efficient kernel is xformers' (the xformers package is not used)"
)


def resolve_attention(cfg: Config, machine: Machine) -> tuple[str, str]:
    """The attention backend (`attention_choice`), through our entry point whenever context parallelism is on:
    it exchanges heads for tokens around the entry point's kernel (model/context_parallel.py)."""
    attn, note = attention_choice(cfg, machine)
    if cfg.cp_size == 1 or attn in OUR_BACKENDS:
        return attn, note
    if machine.flash_attn:
        kernel, name = FA2_VARLEN, "flash-attn's varlen kernel"
    elif machine.varlen_attention:
        kernel, name = VARLEN, "PyTorch's varlen flash attention"
    else:
        kernel, name = SDPA_VARLEN, "PyTorch SDPA per sequence"
    return kernel, (f"context_parallel_size: {cfg.cp_size} runs attention through our entry point: {name} "
                    f"(in place of {attn})")


def attention_choice(cfg: Config, machine: Machine) -> tuple[str, str]:
    """Pick the attention backend. Packed rows stay exact with every choice: our variable-length entry point
    takes the sequence boundaries from the batch (model/attention.py), SDPA and eager a block-diagonal mask
    that transformers builds from the restarting position ids."""
    if cfg.gemma4_hybrid_attn_impl:
        return resolve_hybrid_attention(machine)
    if "xformers" in (cfg.attn_implementation, cfg.attention) or cfg.xformers_attention:
        return "sdpa", XFORMERS_NOTE
    if cfg.attn_implementation and cfg.attention_backend in OUR_FLASH:
        return OUR_FLASH[cfg.attention_backend], (f"set by attn_implementation ({cfg.attention_backend}'s kernel "
                                                  "through our packed-attention entry point)")  # fmt: skip
    if cfg.attn_implementation:
        return cfg.attention_backend, "set by attn_implementation"
    flash = cfg.flash_attention or cfg.attention == "flash"  # axolotl's `attention: flash`: the best flash path
    if cfg.attention and not flash:
        return cfg.attention_backend, "set by attention"
    if flash:
        if machine.flash_attn:
            return FA2_VARLEN, "flash_attention: true and flash-attn is installed: its varlen kernel"
        if machine.varlen_attention:
            return VARLEN, "flash_attention: true, flash-attn not installed: PyTorch's varlen flash attention"
        reason = "no CUDA device" if machine.device != "cuda" else "neither flash-attn nor PyTorch varlen attention"
        return SDPA_VARLEN, (f"flash_attention: true, but {reason}: PyTorch SDPA through our packed-attention "
                             "entry point (each conversation padded to the longest, with its own mask)")  # fmt: skip
    if cfg.sdp_attention:
        return "sdpa", "sdp_attention: true: PyTorch SDPA (block-diagonal mask when packed)"
    return "sdpa", "PyTorch SDPA (block-diagonal mask when packed)"


def resolve_hybrid_attention(machine: Machine) -> tuple[str, str]:
    """`gemma4_hybrid_attn_impl`: the split needs flash-attn; without it SDPA serves every layer (head_dim 512
    included), which is what the split would give the global layers anyway."""
    if machine.flash_attn:
        return HYBRID, ("gemma4_hybrid_attn_impl: flash-attn for the sliding-window layers, PyTorch SDPA for the "
                        "global layers (head_dim above flash-attn's 256; block-diagonal mask when packed)")  # fmt: skip
    reason = "no CUDA device" if machine.device != "cuda" else "flash-attn is not installed"
    return "sdpa", (f"gemma4_hybrid_attn_impl: {reason}, so every layer runs PyTorch SDPA "
                    "(block-diagonal mask when packed), which serves the global layers' head_dim too")  # fmt: skip


DENSE_MASK_LIMIT = 65536  # tokens per row past which a dense row x row mask (4 GiB at this length) is refused
DENSE_MASK_ATTENTION = ("sdpa", "eager")


def check_dense_mask(cfg: Config, attn: str) -> None:
    """SDPA and eager attention get packed or padded rows as a dense `sequence_len x sequence_len` mask from
    transformers (eager also its scores): quadratic in the row length, 1 TB at a million tokens. Refused past
    `DENSE_MASK_LIMIT` tokens when a run starts, before any data or model is loaded (`validate` and `plan` may
    be run on another machine than the one that trains)."""
    if attn not in DENSE_MASK_ATTENTION or cfg.sequence_len <= DENSE_MASK_LIMIT:
        return
    size = cfg.sequence_len**2 / 2**30
    raise EnvironmentProblem(
        f"sequence_len: {cfg.sequence_len} with {attn} attention: transformers gives it a dense "
        f"{cfg.sequence_len} x {cfg.sequence_len} mask per row ({size:,.0f} GiB). Past {DENSE_MASK_LIMIT} tokens "
        "use flash attention on a GPU (flash_attention: true: flash-attn, or PyTorch's varlen kernel) or "
        "attn_implementation: flex_attention"
    )


def resolve_runtime(cfg: Config, machine: Machine | None = None) -> RuntimeSettings:
    """`auto` settings and the attention backend for `machine` (default: this one)."""
    machine = machine or Machine.detect()
    cuda = machine.device == "cuda"
    bf16 = machine.bf16 and not cfg.float16 if cfg.bf16 == "auto" else bool(cfg.bf16)
    fp16 = bool(cfg.fp16) and not bf16
    tf32 = machine.tf32 if cfg.tf32 == "auto" else bool(cfg.tf32)
    if fp16 and not cuda:
        raise EnvironmentProblem("fp16: true needs a CUDA GPU; use bf16 (or neither) on the CPU")
    if cfg.tf32 is True and not machine.tf32:
        raise EnvironmentProblem("tf32: true needs an Ampere or newer NVIDIA GPU; set tf32: auto or false")
    if cfg.fp8 and not machine.fp8:
        raise EnvironmentProblem("fp8: true needs a CUDA GPU of compute capability 8.9 or newer (H100, H200, L40S)")
    attn, note = resolve_attention(cfg, machine)
    if attn == "flex_attention" and cfg.flex_attn_compile_kwargs is not None:
        attn, note = FLEX_COMPILED, f"{note}; compiled with flex_attn_compile_kwargs {cfg.flex_attn_compile_kwargs}"
    launcher = "single process" if machine.world_size == 1 else f"distributed ({machine.world_size} processes)"
    return RuntimeSettings(
        device=machine.device,
        bf16=bf16,
        fp16=fp16,
        tf32=tf32,
        attn_implementation=attn,
        attention_note=note,
        world_size=machine.world_size,
        launcher=launcher,
        liger=machine.liger,
        compile=cuda if cfg.torch_compile == "auto" else cfg.torch_compile,
    )


def resolved_settings(cfg: Config, runtime: RuntimeSettings) -> dict:
    """The config as it runs here: every key with its default filled in and `auto` precision resolved.
    What `validate` prints, what training saves next to the model and hands to wandb."""
    resolved = cfg.model_dump(mode="json", by_alias=True)
    resolved.update(bf16=runtime.bf16, fp16=runtime.fp16, tf32=runtime.tf32, torch_compile=runtime.compile)
    return resolved
