"""ReLoRA (Lialin et al. 2023, arXiv:2307.05695): high-rank training through a sequence of low-rank updates.

Every `jagged_restart_steps` optimizer steps the LoRA update is merged into the base weights, LoRA is started
again (drawn anew as peft draws it, the update zero: the model's function is unchanged), and the Adam moments
of the LoRA parameters are pruned (`relora_prune_ratio`), so the next low-rank update starts fresh; the jagged
learning-rate schedule (train/schedule.py) warms up again after each restart.

The merged weights are kept in float32 ("the sums"), one per adapted layer whose weight cannot hold them: a
4-bit weight (an NF4 step is about a tenth of a weight: an update of a few per cent would mostly round back to
the old code) or a 16-bit one (a bfloat16 step is 0.4-0.8% of a value). The weight the next cycle trains over
is the sum quantised (or rounded) again, so a cycle trains over a copy that has rounded away most of a small
sum, but nothing is lost: the final model is the last sum plus the last update. The first sum is the
dequantised 4-bit base, the weights LoRA was trained against (transformers' 4-bit loading does not keep the
full-precision originals; post/merge.py merges a QLoRA adapter into the same dequantised base). The sums
live on the model (`sums_of`), part of what its weights are: `merged_model(model)` alone gives the final model.

Because the base weights change at every restart, a saved adapter alone no longer describes the model: each
checkpoint after the first restart also holds the sums (`relora_base.safetensors`), written with the model's
files, before the Trainer's state that makes the checkpoint count as complete (train/control.py), and loaded
back on resume; the final output is the whole merged model.
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

from dolphin_train.config.schema import Config
from dolphin_train.errors import ConfigError, DolphinError
from dolphin_train.model.quantised import dequantized, dequantized_model, is_4bit, to_standard_layout
from dolphin_train.train.control import RELORA_FILE as BASE_FILE
from dolphin_train.train.control import CheckpointPart, checkpoint_step, merged_restarts

log = logging.getLogger(__name__)

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


def _is_embedding(layer: Any, name: str) -> bool:
    return name in layer.lora_embedding_A  # peft keeps an embedding's factors apart from the linear layers'


def _unsupported(layer: Any) -> str | None:
    """Why ReLoRA cannot merge and restart this LoRA layer (None: it can)."""
    from peft.tuners.lora import Embedding, Linear

    if getattr(layer, "lora_variant", None):  # DoRA, MiCA, ...: a peft variant, not a plain B @ A update
        kinds = {_variant_name(v) for v in layer.lora_variant.values()}
        return f"a {'/'.join(sorted(kinds))} layer (ReLoRA merges plain LoRA updates B @ A): train a plain LoRA adapter"
    if not isinstance(layer, (Linear, Embedding)) and not _is_4bit_linear(layer):
        kind = type(layer).__name__
        return (f"a LoRA {kind} layer (ReLoRA merges and restarts linear, 4-bit linear and embedding layers): "
                "leave it out of lora_target_modules")  # fmt: skip
    if len(layer.lora_A) + len(layer.lora_embedding_A) != 1:
        return f"{len(layer.lora_A) + len(layer.lora_embedding_A)} adapters (ReLoRA merges one): use one adapter"
    return None


def _variant_name(variant: Any) -> str:
    kind = (variant if isinstance(variant, type) else type(variant)).__name__
    for part in ("LinearVariant", "EmbeddingVariant", "Variant"):
        kind = kind.removesuffix(part)
    return {"Dora": "DoRA"}.get(kind, kind)


def _is_4bit_linear(layer: Any) -> bool:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft defines it only where bitsandbytes is installed
        return False
    return isinstance(layer, Linear4bit)


def refuse_unsupported_layers(model: Any) -> None:
    """Before training: every LoRA layer one ReLoRA can merge and restart, and no adapted weight shared with
    another module (a tied output head: merging its update would change the input embedding too)."""
    problems = []
    layers = lora_layers(model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not any(f".lora_{k}" in f".{name}" for k in ("A", "B")):
            owners.setdefault(id(weight), []).append(_plain_name(name))
    for name, layer in layers.items():
        reason = _unsupported(layer)
        if reason:
            problems.append(f"relora: true cannot restart {_plain_name(name)}: {reason}")
            continue
        base = _plain_name(name) + ".base_layer"
        shared = [o for o in owners.get(id(_base_weight(layer)), []) if o not in (base, _plain_name(name))]
        if shared:
            problems.append(f"relora: true cannot restart {_plain_name(name)}: {_plain_name(name)} shares its "
                            f"weight with {', '.join(shared)} (tied embeddings), and merging the update would "
                            "change both; leave it out of lora_target_modules")  # fmt: skip
    if problems:
        raise ConfigError(problems)


def _plain_name(name: str) -> str:
    """The module's name in the model without peft's wrapper (`base_model.model.`)."""
    return name.removeprefix("base_model.model.")


def lora_delta(layer: Any, device: Any) -> torch.Tensor:
    """The layer's LoRA update as a weight (B @ A x scaling, float32), computed on `device`."""
    from peft.utils import transpose

    name = _adapter(layer)
    if _is_embedding(layer, name):  # A: rank x rows, B: width x rank; the update is (B @ A) transposed
        a = layer.lora_embedding_A[name].detach().to(device, torch.float32)
        b = layer.lora_embedding_B[name].detach().to(device, torch.float32)
        return transpose(b @ a, True) * layer.scaling[name]
    a = layer.lora_A[name].weight.detach().to(device, torch.float32)
    b = layer.lora_B[name].weight.detach().to(device, torch.float32)
    return transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[name]


def _base_weight(layer: Any) -> Any:
    return layer.get_base_layer().weight


def dequantized_base(layer: Any) -> torch.Tensor:
    """The layer's base weight in its own precision (a 4-bit weight dequantised by bitsandbytes)."""
    return dequantized(_base_weight(layer))


def keeps_a_sum(weight: Any) -> bool:
    """Whether the merged weight needs a float32 copy: one that is not itself float32 would round it."""
    return is_4bit(weight) or weight.dtype != torch.float32


SUMS_ATTRIBUTE = "relora_sums"


def sums_of(model: Any) -> dict[str, torch.Tensor]:
    """The float32 sums of a model's adapted layers, by layer name. They are kept on the (peft) model itself, as
    part of what its weights are: `merged_model(model)` alone gives the final model."""
    sums = model.__dict__.get(SUMS_ATTRIBUTE)
    if sums is None:
        sums = model.__dict__[SUMS_ATTRIBUTE] = {}
    return sums


def kept_sum_values(model: Any) -> int:
    """How many float32 values the run's sums hold once every adapted layer has one (for `plan`)."""
    return sum(layer.in_features * layer.out_features for layer in lora_layers(model).values()
               if keeps_a_sum(_base_weight(layer)))  # fmt: skip


def _quantisation_settings(state: Any) -> dict[str, Any]:
    """The 4-bit settings a weight in the standard layout was quantised with."""
    return {"blocksize": state.blocksize, "quant_type": state.quant_type, "compress_statistics": state.nested,
            "dtype": state.dtype, "quant_storage": torch.uint8}  # fmt: skip


def set_base(layer: Any, full: torch.Tensor) -> None:
    """Store `full` as the layer's base weight: rounded to its dtype, or quantised with its 4-bit settings."""
    weight = _base_weight(layer)
    if not is_4bit(weight):
        weight.data.copy_(full.to(weight.device, weight.dtype))
        return
    import bitsandbytes.functional as bnbf

    to_standard_layout(weight)  # a weight bitsandbytes repacked for its CPU kernel: its own settings back
    settings = _quantisation_settings(weight.quant_state)
    if weight.data.dtype != torch.uint8:  # stored in a float dtype (for sharding): bitsandbytes' codes as such
        settings["quant_storage"] = weight.data.dtype
    dtype = settings.pop("dtype")
    packed, state = bnbf.quantize_4bit(full.to(weight.device, dtype), **settings)
    weight.data = packed
    weight.quant_state = state
    if getattr(layer.get_base_layer(), "quant_state", None) is not None:
        layer.get_base_layer().quant_state = state  # bitsandbytes' copy on the module, for its recovery path


@torch.no_grad()
def merge_lora_into_base(model: Any, cpu_offload: bool = False) -> None:
    """Add each layer's LoRA update to its float32 sum (started from the base weight at the first restart, kept
    in CPU memory with `cpu_offload`) and store the sum as the base weight; a float32 weight is its own sum."""
    sums = sums_of(model)
    for name, layer in lora_layers(model).items():
        weight = _base_weight(layer)
        device = "cpu" if cpu_offload else weight.device
        if not keeps_a_sum(weight):
            weight.data.add_(lora_delta(layer, device).to(weight.device))
            continue
        if name not in sums:
            sums[name] = dequantized_base(layer).to(device, torch.float32, copy=True)
        sums[name].add_(lora_delta(layer, sums[name].device))
        set_base(layer, sums[name])


@torch.no_grad()
def restart_lora(model: Any, generator: torch.Generator) -> None:
    """LoRA started again as peft starts it, so that the update is zero: a linear layer's A drawn
    Kaiming-uniform (a = sqrt(5)) and B zero; an embedding's A zero and B drawn from a standard normal."""
    for layer in lora_layers(model).values():
        for name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            drawn = torch.empty(a.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
            a.copy_(drawn.to(a.device, a.dtype))
            b.zero_()
        for name in layer.lora_embedding_A:
            a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
            a.zero_()
            b.copy_(torch.randn(b.shape, generator=generator).to(b.device, b.dtype))


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

SUMS_FORMAT = "relora-float32-sums"  # the file's metadata: what its tensors are


def base_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The adapted layers' merged weights in float32: the kept sums, and the float32 weights that are their
    own sums."""
    sums, tensors = sums_of(model), {}
    for name, layer in lora_layers(model).items():
        merged = sums.get(name)
        if merged is None:
            merged = dequantized_base(layer).float()
        tensors[f"{name}.weight"] = merged.detach().cpu().contiguous()
    return tensors


def save_base(model: Any, directory: str | Path) -> Path:
    """Written into a checkpoint through a temporary name: a file cut off mid-write is never read as a
    complete one."""
    from safetensors.torch import save_file

    path = Path(directory, BASE_FILE)
    partial = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(base_tensors(model), str(partial), metadata={"format": SUMS_FORMAT})
    os.replace(partial, path)
    return path


@torch.no_grad()
def load_base(model: Any, path: str | Path, cpu_offload: bool = False) -> None:
    """The merged weights of a checkpoint back into the model: the sums kept as they were saved, and the
    weights the next cycle trains over derived from them as a restart derives them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as file:
        written = (file.metadata() or {}).get("format")
    if written != SUMS_FORMAT:
        raise DolphinError(f"{path} holds ReLoRA weights in an older format (merged into the 4-bit or 16-bit "
                           "weights, which lost most of each update); resume from a checkpoint written by this "
                           "version, or start the run again")  # fmt: skip
    tensors, sums = load_file(str(path)), sums_of(model)
    for name, layer in lora_layers(model).items():
        weight = _base_weight(layer)
        saved = tensors[f"{name}.weight"]
        if not keeps_a_sum(weight):
            weight.data.copy_(saved)
            continue
        sums[name] = saved.to("cpu" if cpu_offload else weight.device)
        set_base(layer, sums[name])


@torch.no_grad()
def merged_model(model: Any) -> Any:
    """The whole model with everything merged, as a plain transformers model: each adapted layer's float32 sum
    (or float32 weight) plus the current LoRA update, stored in the weight's dtype (a 4-bit base dequantised);
    trained token rows and saved modules merged by peft."""
    layers, sums = lora_layers(model), sums_of(model)
    merged = {}
    for name, layer in layers.items():
        total = sums.pop(name, None)  # the run is over: the sum itself takes the last update
        if total is None:
            total = dequantized_base(layer).float()
        merged[_plain_name(name)] = total.add_(lora_delta(layer, total.device)).cpu()
        for adapter in layer.lora_B:  # peft then merges a zero update: the rest of the model only
            layer.lora_B[adapter].weight.zero_()
        for adapter in layer.lora_embedding_A:
            layer.lora_embedding_A[adapter].zero_()
    quantised = any(is_4bit(_base_weight(layer)) for layer in layers.values())
    plain = model.merge_and_unload()
    if quantised:
        plain = dequantized_model(plain)
    for name, module in plain.named_modules():
        if name in merged:
            module.weight.data = merged.pop(name).to(module.weight.device, module.weight.dtype)
    return plain


# ---- the callback -------------------------------------------------------------------------------------------


class ReLoRA(CheckpointPart):
    """Restarts LoRA at the start of every `restart_steps`-th optimizer step; writes the merged weights' float32
    sums into each checkpoint and loads them on resume."""

    def __init__(self, restart_steps: int, prune_ratio: float, prune_method: str, cpu_offload: bool, seed: int,
                 resume_from: str | None = None) -> None:  # fmt: skip
        self.restart_steps, self.prune_ratio, self.prune_method = restart_steps, prune_ratio, prune_method
        self.cpu_offload, self.seed, self.resume_from = cpu_offload, seed, resume_from
        self.restarts = 0
        self._last_restart_step = -1

    @classmethod
    def from_config(cls, cfg: Config, model: Any, resume_from: str | None = None) -> ReLoRA:
        refuse_unsupported_layers(model)
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
        step = checkpoint_step(self.resume_from)
        self.restarts = merged_restarts(step, self.restart_steps)
        if self.restarts == 0:
            return control  # no restart before this checkpoint: its base is the model's own
        path = Path(self.resume_from, BASE_FILE)
        if not path.exists():
            raise DolphinError(f"resume_from_checkpoint: {self.resume_from} lacks {BASE_FILE}, the base weights "
                               f"after {self.restarts} ReLoRA restart(s); resume from another checkpoint")  # fmt: skip
        load_base(model, path, self.cpu_offload)
        log.info("ReLoRA: base weights after %d restart(s) loaded from %s", self.restarts, path)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> Any:  # fmt: skip
        step = state.global_step
        if step > 0 and step % self.restart_steps == 0 and step != self._last_restart_step:
            self._last_restart_step = step
            self.restart(model, optimizer, step)
        return control

    def save_into_checkpoint(self, directory: str, model: Any, step: int) -> None:
        """After the first restart, the merged weights (the rule `files_a_checkpoint_needs` checks)."""
        if merged_restarts(step, self.restart_steps) > 0:
            save_base(model, directory)
