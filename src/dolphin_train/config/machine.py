"""What the machine a run happens on can do: detected on this machine, or described for a plan.

Every capability probe lives here (CUDA, bf16, TF32, PyTorch's varlen flash attention, optional kernel
packages), so that `resolve_runtime` decides `auto` settings from one description of the hardware, the
same way for a training run (the machine found) and for `dolphin-train plan` (the machine planned for).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from dolphin_train.process_group import world_size


@dataclass(frozen=True)
class Machine:
    device: str  # "cuda" or "cpu"
    bf16: bool  # bfloat16 arithmetic supported
    tf32: bool  # TF32 matmuls supported (Ampere or newer)
    varlen_attention: bool  # PyTorch's variable-length flash attention kernel usable
    flash_attn: bool  # the flash-attn package usable
    liger: bool  # the liger-kernel package usable
    fp8: bool = False  # float8 matrix products (compute capability 8.9 or newer: Ada, Hopper)
    world_size: int = 1
    device_name: str = ""
    memory: int | None = None  # bytes per device (None on the CPU)

    @classmethod
    def detect(cls) -> Machine:
        import torch

        cuda = torch.cuda.is_available()
        return cls(
            device="cuda" if cuda else "cpu",
            bf16=cuda and torch.cuda.is_bf16_supported(),
            tf32=cuda and torch.cuda.get_device_capability()[0] >= 8,
            varlen_attention=cuda and torch_varlen_available(),
            flash_attn=cuda and package_installed("flash_attn"),
            liger=cuda and package_installed("liger_kernel"),
            fp8=cuda and torch.cuda.get_device_capability() >= (8, 9),
            world_size=world_size(),
            device_name=torch.cuda.get_device_name() if cuda else "cpu",
            memory=torch.cuda.get_device_properties(0).total_memory if cuda else None,
        )

    @classmethod
    def planned(cls, device: str, gpus: int, memory: int | None = None, liger: bool | None = None) -> Machine:
        """The machine `dolphin-train plan` plans for: GPUs of the Ampere generation or newer (bf16, TF32 and
        flash attention), with the kernel packages installed here (`liger`: liger-kernel there or not, when
        the GPU machine's packages differ from this one's); or a CPU."""
        cuda = device == "cuda"
        return cls(
            device=device,
            bf16=cuda,
            tf32=cuda,
            varlen_attention=cuda,
            flash_attn=cuda and package_installed("flash_attn"),
            liger=cuda and (package_installed("liger_kernel") if liger is None else liger),
            fp8=cuda,
            world_size=gpus,
            device_name="planned GPU" if cuda else "cpu",
            memory=memory,
        )


def package_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def torch_varlen_available() -> bool:
    """PyTorch 2.10+ ships `torch.nn.attention.varlen.varlen_attn`, a flash-attention kernel over
    concatenated sequences; it needs CUDA."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True
