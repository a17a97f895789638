"""`micro_batch_size: auto`, `gradient_checkpointing: auto`, `activation_offloading: auto` and `tiled_mlp: auto`:
the plan picks, for the device a run will have, the fastest settings that fit, and says why.

The order of preference: recompute as little as possible first (no checkpointing, then every 4th, every
2nd, then every layer, then every layer with its inputs offloaded to CPU memory: each step down costs
speed), and within that the largest micro-batch that fits, since a larger batch amortises each step's
fixed costs. With `tiled_mlp: auto`, all of that untiled first, then with the MLPs tiled. With `batch_size`
the micro-batch divides it and accumulation makes up the rest, so the effective batch stays as the config
sets it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.plan.memory import GiB, MemoryEstimate, MemoryModel

MAX_AUTO_MICRO_BATCH = 64
# (gradient_checkpointing, gradient_checkpointing_layers, activation_offloading), fastest first.
CHECKPOINTING_LADDER = ((False, 1, False), (True, 4, False), (True, 2, False), (True, 1, False), (True, 1, True))


@dataclass(frozen=True)
class AutoChoice:
    cfg: Config  # the config with its `auto` values replaced by the choice
    reasons: tuple[str, ...]  # what was chosen and why, for the run overview and the plan
    fits: bool


def _checkpointing_options(cfg: Config) -> list[tuple[bool, int, bool]]:
    """(checkpointing, every N layers, offloading) to try, fastest first."""
    if cfg.gradient_checkpointing == "auto":
        options = list(CHECKPOINTING_LADDER)
    elif cfg.checkpointing:
        every = cfg.gradient_checkpointing_layers
        options = [(True, every, False), (True, every, True)]
    else:
        options = [(False, 1, False)]
    if cfg.offloads_activations:  # asked for: only settings that offload
        return [o for o in options if o[2]]
    if cfg.activation_offloading is False:
        return [o for o in options if not o[2]]
    return options  # activation_offloading: auto, as the last resort


def _micro_batches(cfg: Config, rows: int | None) -> list[int]:
    """Candidates, largest first; never more rows than a process will see in an epoch (`rows`, when known)."""
    if cfg.micro_batch_size != "auto":
        return [cfg.micro_batch_size]
    largest = min(MAX_AUTO_MICRO_BATCH, rows or MAX_AUTO_MICRO_BATCH)
    if cfg.batch_size:
        return [m for m in range(min(cfg.batch_size, largest), 0, -1) if cfg.batch_size % m == 0]
    return [2**k for k in range(MAX_AUTO_MICRO_BATCH.bit_length() - 1, -1, -1) if 2**k <= largest] or [1]


def _settings(cfg: Config, micro: int, checkpointing: tuple[bool, int, bool]) -> dict[str, Any]:
    on, every, offload = checkpointing
    accumulation = cfg.batch_size // micro if cfg.batch_size and cfg.micro_batch_size == "auto" else None
    settings = {"micro_batch_size": micro, "gradient_checkpointing": on, "gradient_checkpointing_layers": every,
                "activation_offloading": offload}  # fmt: skip
    if accumulation is not None:
        settings["gradient_accumulation_steps"] = accumulation
    return settings


def _candidates(cfg: Config, rows: int | None) -> Iterator[dict[str, Any]]:
    """With `tiled_mlp: auto`, every setting untiled first: tiling costs one more MLP forward pass. Not tried
    where the config's checks would refuse `tiled_mlp: true` (Liger's MLP asked for by name, FSDP1)."""
    if cfg.tiled_mlp == "auto":
        tiling = not cfg.model_copy(update={"tiled_mlp": True}).tiled_mlp_problems()
        choices: tuple[bool | None, ...] = (False, True) if tiling else (False,)
    else:
        choices = (None,)
    for tiled in choices:
        for checkpointing in _checkpointing_options(cfg):
            for micro in _micro_batches(cfg, rows):
                yield _settings(cfg, micro, checkpointing) | ({"tiled_mlp": tiled} if tiled is not None else {})


def _describe(settings: dict[str, Any], estimate: MemoryEstimate, budget: int, where: str) -> tuple[str, ...]:
    return (f"auto settings for {where}: {_said(settings)}",
            f"estimated peak {estimate.total / GiB:.1f} GiB of {budget / GiB:.1f} GiB: the fastest of the settings "
            "tried that fits (less recomputation first, then the largest micro-batch)")  # fmt: skip


def _said(settings: dict[str, Any]) -> str:
    on, every, offload = (settings[k] for k in ("gradient_checkpointing", "gradient_checkpointing_layers",
                                                "activation_offloading"))  # fmt: skip
    checkpointing = "off" if not on else "every layer" if every == 1 else f"every {every} layers"
    said = [f"micro_batch_size {settings['micro_batch_size']}", f"gradient checkpointing {checkpointing}"]
    if offload:
        said.append("activation offloading on")
    if settings.get("tiled_mlp") is not None:
        said.append(f"tiled MLP {'on' if settings['tiled_mlp'] else 'off'}")
    if "gradient_accumulation_steps" in settings:
        said.append(f"gradient_accumulation_steps {settings['gradient_accumulation_steps']} (batch_size kept)")
    return ", ".join(said)


def choose_auto_settings(
    cfg: Config, memory: MemoryModel, budget: int, where: str, rows: int | None = None
) -> AutoChoice:
    """The config with its `auto` memory settings decided for `budget` bytes per device (`where` names it);
    `rows`: the training rows per process, when known (no larger micro-batch is tried)."""
    if not cfg.has_auto_memory_settings:
        return AutoChoice(cfg, (), True)
    last: dict[str, Any] = {}
    for settings in _candidates(cfg, rows):
        candidate = cfg.model_copy(update=settings)
        estimate = memory.estimate(candidate)
        last = settings
        if estimate.total <= budget:
            return AutoChoice(candidate, _describe(settings, estimate, budget, where), True)
    candidate = cfg.model_copy(update=last)  # the most frugal setting tried: the plan then says it does not fit
    reason = f"auto settings for {where}: nothing tried fits; the most frugal: {_said(last)}"
    return AutoChoice(candidate, (reason,), False)


def resolve_for_runtime(
    cfg: Config, runtime: RuntimeSettings, memory: MemoryModel, budget: int, rows: int | None = None
) -> AutoChoice:
    where = f"{runtime.world_size} x {budget / GiB:.1f} GiB {'GPU' if runtime.device == 'cuda' else 'of CPU memory'}"
    per_process = -(-rows // runtime.world_size) if rows else None
    return choose_auto_settings(cfg, memory, budget, where, per_process)
