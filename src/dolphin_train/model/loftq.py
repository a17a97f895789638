"""LoftQ (`peft: {loftq_config: ...}`): a new LoRA adapter initialised so that a quantised base plus the adapter
is close to the original weights, and training then continues from there.

What LoftQ trains over is not the original base: each adapted layer's weight W is replaced by Q, its
quantised-then-dequantised version, and A, B start where Q + scaling * B A ~= W. Training moves A and B
only, so the trained model is Q + scaling * B' A'. The adapter is therefore relative to Q: applied to the
original W it would add the quantisation correction a second time. So Q is saved next to every adapter this
run writes (`loftq_base.safetensors`: the adapted layers' weights, in the dtype the run trained with), and
`merge-lora`, `chat` and `lora_model_dir` put those weights into the base before applying the adapter. Saving
rather than recomputing makes the merge exact on any machine: the quantiser's rounding and the SVD differ
slightly between CPU and GPU, and with `loftq_iter` > 1 each iteration's SVD feeds the next quantisation.

Why not peft's own LoftQ (`LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))`), which is
what axolotl passes: (1) peft's `loftq_init` moves every weight to "cuda" unconditionally, so it cannot run
on a CPU machine at all; (2) it sets A and B from the residual's SVD without dividing by LoRA's scaling
(alpha / r), so with alpha != r (axolotl's example: r 32, alpha 16) the adapter starts at half the correction
(peft issue #1982); (3) it saves `init_lora_weights: "loftq"` in adapter_config.json, so every later
`PeftModel.from_pretrained` quantises the base again (on CUDA only). `replace_lora_weights_loftq`, peft's
other entry point, is for a base already loaded in 4 bits and is also CUDA-only. Here the same algorithm
(bitsandbytes' NF4 with 64-value blocks and no double quantisation, or its row-wise int8; the residual's
truncated SVD split evenly between A and B, alternated `loftq_iter` times) runs on the GPU when there is one,
else on the CPU, with the scaling taken into account; peft creates the LoRA layers as usual and the saved
adapter is a plain one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dolphin_train.config.schema import LoftQSettings
from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)

LOFTQ_BASE_FILE = "loftq_base.safetensors"
_PEFT_PREFIX = "base_model.model."
NF4_BLOCK = 64  # bitsandbytes' Params4bit default, as peft's LoftQ uses


def quantised(weight: Any, bits: int) -> Any:
    """`weight` (float32) after a round trip through bitsandbytes' 4-bit NF4 or 8-bit row-wise quantisation."""
    import bitsandbytes.functional as bnbf

    if bits == 4:
        packed, state = bnbf.quantize_4bit(weight, blocksize=NF4_BLOCK, compress_statistics=False, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).float()
    codes, row_scales, _ = bnbf.int8_vectorwise_quant(weight)
    return bnbf.int8_vectorwise_dequant(codes, row_scales).float()


def loftq_decomposition(weight: Any, bits: int, rank: int, scaling: float, iterations: int = 1) -> tuple[Any, ...]:
    """LoftQ's alternating minimisation for one weight matrix (out x in): returns (Q, A, B), with Q the
    quantised base and A (rank x in), B (out x rank) such that Q + scaling * B @ A ~= weight. Each round
    quantises what the low-rank part does not explain, then fits the low-rank part to what the quantisation
    missed (a truncated SVD, the best rank-r fit)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else weight.device
    with torch.no_grad():
        target = weight.detach().to(device=device, dtype=torch.float32)
        low_rank = torch.zeros_like(target)
        for _ in range(iterations):
            base = quantised(target - low_rank, bits)
            u, s, vh = torch.linalg.svd(target - base, full_matrices=False)
            # sqrt(S) on each side (as LoftQ does) keeps A and B the same size; 1/sqrt(scaling) on each side
            # undoes the LoRA scaling the forward pass applies.
            root = (s[:rank] / scaling).sqrt()
            lora_b, lora_a = _padded(u[:, :rank] * root, rank, 1), _padded(root[:, None] * vh[:rank], rank, 0)
            low_rank = scaling * (lora_b @ lora_a)
    return base.to(weight.device, weight.dtype), lora_a.to(weight.device), lora_b.to(weight.device)


def _padded(factor: Any, rank: int, dim: int) -> Any:
    """A rank larger than the layer's smaller side: the SVD has fewer directions; the rest start at zero."""
    import torch

    missing = rank - factor.shape[dim]
    if missing <= 0:
        return factor
    shape = list(factor.shape)
    shape[dim] = missing
    return torch.cat([factor, factor.new_zeros(shape)], dim=dim)


def _lora_linears(model: Any) -> list[tuple[str, Any]]:
    """(base-model parameter name of the weight, peft LoRA layer) for every LoRA-adapted layer."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            kind = type(module.get_base_layer()).__name__
            raise DolphinError(f"peft.loftq_config: LoftQ initialises LoRA on linear layers; {name} is a {kind}: "
                               "leave it out of lora_target_modules")  # fmt: skip
        found.append((name.removeprefix(_PEFT_PREFIX) + ".weight", module))
    return found


def initialise_with_loftq(model: Any, settings: LoftQSettings, adapter: str = "default") -> int:
    """Replace each adapted layer's base weight by its LoftQ quantisation and start its LoRA matrices at the
    correction. Returns the number of layers."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise DolphinError("peft.loftq_config needs each layer's whole weight, which DeepSpeed ZeRO-3 partitions "
                           "as it loads: use ZeRO-2, FSDP or one GPU")  # fmt: skip
    layers = _lora_linears(model)
    log.info("LoftQ: quantising %d adapted layers to %d bits (%d round%s) and initialising LoRA from the residual",
             len(layers), settings.loftq_bits, settings.loftq_iter, "s" * (settings.loftq_iter > 1))  # fmt: skip
    with torch.no_grad():
        for _, layer in layers:
            base = layer.get_base_layer()
            transposed = layer.fan_in_fan_out  # Conv1D (GPT-2) stores (in, out)
            weight = base.weight.T if transposed else base.weight
            q, lora_a, lora_b = loftq_decomposition(weight, settings.loftq_bits, layer.r[adapter],
                                                    layer.scaling[adapter], settings.loftq_iter)  # fmt: skip
            base.weight.data = (q.T if transposed else q).contiguous()
            layer.lora_A[adapter].weight.data = lora_a.to(layer.lora_A[adapter].weight.dtype)
            layer.lora_B[adapter].weight.data = lora_b.to(layer.lora_B[adapter].weight.dtype)
    if torch.cuda.is_available():
        # The model is still on the CPU here; each layer's float32 copies and SVD ran on the GPU, one at a time.
        # Hand that cache back, so the run's reserved memory is what training itself needs (the plan's count).
        torch.cuda.empty_cache()
    return len(layers)


def loftq_base_weights(model: Any) -> dict[str, Any]:
    """The adapted layers' base weights (LoftQ's Q), by their names in the base model."""
    return {name: layer.get_base_layer().weight.detach().contiguous() for name, layer in _lora_linears(model)}


def save_loftq_base(model: Any, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(directory, LOFTQ_BASE_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in loftq_base_weights(model).items()}, str(path), metadata={"format": "pt"})
    return path


def has_loftq_base(directory: str | Path | None) -> bool:
    return directory is not None and Path(directory, LOFTQ_BASE_FILE).is_file()


def load_loftq_base(base_model: Any, directory: str | Path) -> int:
    """Put a LoftQ adapter's base weights (saved next to it) into the original base model, before the adapter
    is applied. Returns the number of weights replaced."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(directory, LOFTQ_BASE_FILE)))
    missing = base_model.load_state_dict(weights, strict=False).unexpected_keys
    if missing:
        raise DolphinError(f"{Path(directory, LOFTQ_BASE_FILE)} holds weights this base model lacks, e.g. "
                           f"{missing[0]}: the adapter was trained over another base")  # fmt: skip
    log.info("LoftQ adapter: %d base weights as LoftQ quantised them, from %s", len(weights), directory)
    return len(weights)
