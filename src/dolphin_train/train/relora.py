"""ReLoRA (Lialin et al. 2023, arXiv:2307.05695): high-rank training through a sequence of low-rank updates.

Every `jagged_restart_steps` optimizer steps the LoRA update is merged into the base weights (dequantised,
added and re-quantised for a 4-bit base), LoRA is started again (A drawn anew as peft draws it, B zero: the
model's function is unchanged), and the Adam moments of the LoRA parameters are pruned
(`relora_prune_ratio`), so the next low-rank update starts fresh; the jagged learning-rate schedule
(train/schedule.py) warms up again after each restart.

Because the base weights change at every restart, a saved adapter alone no longer describes the model:
each checkpoint after the first restart also holds the adapted layers' current base weights
(`relora_base.safetensors`), loaded back on resume, and the final output is the whole merged model.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from dolphin_train.config.schema import Config
from dolphin_train.errors import ConfigError, DolphinError
from dolphin_train.model.quantised import dequantized, is_4bit

log = logging.getLogger(__name__)

BASE_FILE = "relora_base.safetensors"
DEFAULT_PRUNE_RATIO = 0.9
FULL_RESET_RATIO = 0.999  # `relora_prune_method: reset` (the paper's near-full reset), as axolotl defaults it
BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise 8-bit optimizer states are quantised in blocks of 256 values
# bitsandbytes' 8-bit Adam keeps each moment as (codes, per-block absmax, code map).
BNB_8BIT_MOMENTS = (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2"))
TORCH_MOMENTS = ("exp_avg", "exp_avg_sq")


def restart_seed(seed: int, restart: int, purpose: int) -> int:
    """A seed that depends only on the run's seed and the restart: every process draws the same new A
    (DDP never re-broadcasts parameters) and a resumed run draws what the first run drew."""
    return int(np.random.SeedSequence([seed, restart, purpose]).generate_state(1)[0])


def merged_restarts(global_step: int, restart_steps: int) -> int:
    """Restarts done once `global_step` optimizer steps are complete: a restart runs at the start of
    step `k * restart_steps + 1`, so a checkpoint saved at a multiple of `restart_steps` predates it."""
    return max(0, (global_step - 1) // restart_steps)


# ---- the LoRA layers and their base weights ------------------------------------------------------------


def lora_layers(model: Any) -> dict[str, Any]:
    """peft's LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _adapter(layer: Any) -> str:
    adapters = list(layer.active_adapters)
    if len(adapters) != 1:
        raise DolphinError(f"relora merges one active LoRA adapter; this layer has {adapters}")
    return adapters[0]


def lora_delta(layer: Any, device: Any) -> torch.Tensor:
    """The layer's LoRA update as a weight (B @ A x scaling, float32), computed on `device`."""
    from peft.utils import transpose

    name = _adapter(layer)
    a = layer.lora_A[name].weight.detach().to(device, torch.float32)
    b = layer.lora_B[name].weight.detach().to(device, torch.float32)
    return transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[name]


def _base_weight(layer: Any) -> Any:
    return layer.get_base_layer().weight


def dequantized_base(layer: Any) -> torch.Tensor:
    """The layer's base weight in its own precision (a 4-bit weight dequantised by bitsandbytes)."""
    return dequantized(_base_weight(layer))


def set_base(layer: Any, full: torch.Tensor) -> None:
    """Store `full` as the layer's base weight (re-quantised with the weight's own 4-bit settings)."""
    weight = _base_weight(layer)
    if not is_4bit(weight):
        weight.data.copy_(full.to(weight.device, weight.dtype))
        return
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    packed, new_state = bnbf.quantize_4bit(full.to(weight.device, state.dtype), blocksize=state.blocksize,
                                           compress_statistics=state.nested, quant_type=state.quant_type,
                                           quant_storage=weight.data.dtype)  # fmt: skip
    weight.data = packed
    weight.quant_state = new_state


@torch.no_grad()
def merge_lora_into_base(model: Any, cpu_offload: bool = False) -> None:
    """base += LoRA update, in float32, layer by layer; `cpu_offload` does the arithmetic in CPU memory."""
    for layer in lora_layers(model).values():
        device = "cpu" if cpu_offload else _base_weight(layer).device
        merged = dequantized_base(layer).to(device, torch.float32) + lora_delta(layer, device)
        set_base(layer, merged)


@torch.no_grad()
def restart_lora(model: Any, generator: torch.Generator) -> None:
    """A drawn anew as peft initialises it (Kaiming-uniform, a = sqrt(5)), B zero: the update is zero."""
    for layer in lora_layers(model).values():
        for name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            drawn = torch.empty(a.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
            a.copy_(drawn.to(a.device, a.dtype))
            b.zero_()


# ---- pruning the optimizer states -------------------------------------------------------------------------


@torch.no_grad()
def prune_(values: torch.Tensor, ratio: float, method: str, generator: torch.Generator) -> torch.Tensor:
    """Zero a `ratio` fraction of `values` in place: the smallest in magnitude (`magnitude`), or drawn at
    random (`random`, `reset`)."""
    flat = values.view(-1)
    if method == "magnitude":
        count = int(ratio * flat.numel())
        if count:
            # kthvalue, not quantile: quantile refuses tensors over 16M values (a large layer's moments).
            threshold = flat.abs().float().kthvalue(count).values
            flat.mul_((flat.abs().float() > threshold).to(flat.dtype))
        return values
    keep = torch.rand(flat.shape, generator=generator) >= ratio
    flat.mul_(keep.to(flat.device, flat.dtype))
    return values


def prune_moments(state: dict[str, Any], ratio: float, method: str, generator: torch.Generator) -> None:
    """Prune one parameter's Adam moments: torch's float tensors directly, bitsandbytes' 8-bit codes
    through their values (dequantised, pruned, re-quantised with the same code map: in the first moment's
    signed map the byte 0 is the code of about -1 x the block's absmax, so zeroing the bytes would not zero
    the moment)."""
    for key in TORCH_MOMENTS:
        if torch.is_tensor(state.get(key)):
            prune_(state[key], ratio, method, generator)
    for codes, absmax, qmap in BNB_8BIT_MOMENTS:
        value = state.get(codes)
        if not torch.is_tensor(value):
            continue
        if value.dtype != torch.uint8:  # bitsandbytes keeps small parameters' states in float32
            prune_(value, ratio, method, generator)
            continue
        import bitsandbytes.functional as bnbf

        full = bnbf.dequantize_blockwise(value, absmax=state[absmax], code=state[qmap], blocksize=BNB_BLOCKSIZE)
        prune_(full, ratio, method, generator)
        codes, quant = bnbf.quantize_blockwise(full, code=state[qmap], blocksize=BNB_BLOCKSIZE)
        # bitsandbytes rounds 0 to the nearest non-zero code: the pruned values get the code of 0 itself
        codes[full == 0] = int((state[qmap] == 0).nonzero()[0])
        value.copy_(codes)
        state[absmax].copy_(quant.absmax)


def prune_optimizer_states(optimizer: Any, params: Iterable[torch.nn.Parameter], ratio: float, method: str,
                           generator: torch.Generator) -> None:  # fmt: skip
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    for param in params:
        state = inner.state.get(param)
        if state:
            prune_moments(state, ratio, method, generator)


def lora_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]


# ---- checkpoints and the final model ----------------------------------------------------------------------


def base_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The adapted layers' current base weights (a 4-bit one as its packed codes and quantisation state)."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        weight = _base_weight(layer)
        tensors[f"{name}.weight"] = weight.data.detach().cpu().contiguous()
        if is_4bit(weight):
            for key, value in weight.quant_state.as_dict(packed=True).items():
                tensors[f"{name}.weight.{key}"] = value.detach().cpu().contiguous()
    return tensors


def save_base(model: Any, directory: str | Path) -> Path:
    """Written next to the Trainer's checkpoint files, through a temporary name: a file cut off mid-write is
    never read as a complete one."""
    from safetensors.torch import save_file

    path = Path(directory, BASE_FILE)
    partial = path.with_suffix(".partial")
    save_file(base_tensors(model), str(partial))
    os.replace(partial, path)
    return path


@torch.no_grad()
def load_base(model: Any, path: str | Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, layer in lora_layers(model).items():
        weight = _base_weight(layer)
        saved = tensors[f"{name}.weight"]
        if not is_4bit(weight):
            weight.data.copy_(saved)
            continue
        import bitsandbytes.functional as bnbf

        prefix = f"{name}.weight."
        stats = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        weight.data = saved.to(weight.device)
        weight.quant_state = bnbf.QuantState.from_dict(stats, device=weight.device)


@torch.no_grad()
def merged_model(model: Any) -> Any:
    """The whole model with everything merged, as a plain transformers model: the base weights (a 4-bit base
    dequantised) plus the current LoRA update, trained token rows and saved modules by peft's merge."""
    layers = lora_layers(model)
    if not any(is_4bit(_base_weight(layer)) for layer in layers.values()):
        return model.merge_and_unload()
    # 4-bit: peft's merge would re-quantise the sum. The full-precision sums are kept, LoRA zeroed so that
    # peft merges only the rest, and the dequantised model's adapted weights replaced by the sums.
    sums = {}
    for name, layer in layers.items():
        sums[name.removeprefix("base_model.model.")] = (
            dequantized_base(layer).float().cpu() + lora_delta(layer, "cpu")
        )
        for adapter in layer.lora_B:
            layer.lora_B[adapter].weight.zero_()
    plain = model.merge_and_unload()
    plain = plain.dequantize()
    for name, module in plain.named_modules():
        if name in sums:
            module.weight.data = sums[name].to(module.weight.device, module.weight.dtype)
    return plain


# ---- the callback -------------------------------------------------------------------------------------------


class ReLoRA(TrainerCallback):
    """Restarts LoRA at the start of every `restart_steps`-th optimizer step; saves and loads the merged base
    with each checkpoint."""

    def __init__(self, restart_steps: int, prune_ratio: float, prune_method: str, cpu_offload: bool, seed: int,
                 resume_from: str | None = None) -> None:  # fmt: skip
        self.restart_steps, self.prune_ratio, self.prune_method = restart_steps, prune_ratio, prune_method
        self.cpu_offload, self.seed, self.resume_from = cpu_offload, seed, resume_from
        self.restarts = 0
        self._last_restart_step = -1

    @classmethod
    def from_config(cls, cfg: Config, resume_from: str | None = None) -> ReLoRA:
        method = cfg.relora_prune_method or "magnitude"
        ratio = cfg.relora_prune_ratio
        if ratio is None:
            ratio = FULL_RESET_RATIO if method == "reset" else DEFAULT_PRUNE_RATIO
        every = cfg.jagged_restart_steps
        if not every:  # the config refuses relora without it; a Config built otherwise says so here
            raise ConfigError(["relora: true restarts LoRA every jagged_restart_steps steps: set jagged_restart_steps"])
        log.info("ReLoRA: LoRA merged and restarted every %d steps; %s pruning of %.1f%% of its optimizer states",
                 every, method, 100 * ratio)  # fmt: skip
        return cls(every, ratio, method, bool(cfg.relora_cpu_offload), cfg.seed, resume_from)

    def restart(self, model: Any, optimizer: Any, step: int) -> None:
        """Merge, restart LoRA and prune its optimizer states: the restart that opens step `step + 1`."""
        index = step // self.restart_steps
        merge_lora_into_base(model, self.cpu_offload)
        restart_lora(model, torch.Generator().manual_seed(restart_seed(self.seed, index, 0)))
        if optimizer is not None:
            prune_optimizer_states(optimizer, lora_parameters(model), self.prune_ratio, self.prune_method,
                                   torch.Generator().manual_seed(restart_seed(self.seed, index, 1)))  # fmt: skip
        self.restarts = index
        log.info("ReLoRA restart %d at step %d: LoRA merged into the base and started again", index, step)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.resume_from is None:
            return control
        from dolphin_train.train.control import checkpoint_step

        step = checkpoint_step(self.resume_from)
        self.restarts = merged_restarts(step, self.restart_steps)
        if self.restarts == 0:
            return control  # no restart before this checkpoint: its base is the model's own
        path = Path(self.resume_from, BASE_FILE)
        if not path.exists():
            raise DolphinError(f"resume_from_checkpoint: {self.resume_from} lacks {BASE_FILE}, the base weights "
                               f"after {self.restarts} ReLoRA restart(s); resume from another checkpoint")  # fmt: skip
        load_base(model, path)
        log.info("ReLoRA: base weights after %d restart(s) loaded from %s", self.restarts, path)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> Any:  # fmt: skip
        step = state.global_step
        if step > 0 and step % self.restart_steps == 0 and step != self._last_restart_step:
            self._last_restart_step = step
            self.restart(model, optimizer, step)
        return control

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if state.is_world_process_zero and merged_restarts(state.global_step, self.restart_steps) > 0:
            save_base(model, Path(args.output_dir, f"checkpoint-{state.global_step}"))
        return control
