"""Assemble the plan (model, data, memory), judge whether it fits, and find the change that would."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dolphin_train.config.machine import Machine
from dolphin_train.config.resolve import RuntimeSettings, resolve_runtime
from dolphin_train.config.schema import Config
from dolphin_train.errors import ConfigError
from dolphin_train.plan.auto import AutoChoice, resolve_for_runtime
from dolphin_train.plan.memory import (
    GiB,
    MemoryEstimate,
    estimate_memory,
    measure_model,
    plan_sharding,
    tokens_per_device,
)
from dolphin_train.plan.steps import DataPlan, plan_data
from dolphin_train.train.schedule import batch_shape

log = logging.getLogger(__name__)
HEADROOM_WARNING = 0.10  # under 10% to spare: fits, but tight
# The repository's DeepSpeed configs (a source checkout); suggestions that need them are skipped elsewhere.
DEEPSPEED_DIR = Path(__file__).resolve().parents[3] / "deepspeed_configs"


def parse_memory(text: str) -> int:
    """'80GB' (10^9 bytes, as GPU vendors count), '80GiB', '81920MiB', '24G' (GB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise ConfigError([f"--gpu-memory {text!r}: write it like 80GB, 48GiB or 24000MiB"], source="command line")
    value, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    scale = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4}[unit] if unit else 3  # a bare number is GB
    return int(value * (1024 if binary else 1000) ** scale)


def default_gpu_memory() -> int:
    """This machine's GPU memory, else 80 GB (the common training card)."""
    return Machine.detect().memory or parse_memory("80GB")


@dataclass(frozen=True)
class ModelFacts:
    config: Any
    source: str
    vocab_rows: int
    new_token_ids: list[int]  # ids of the tokens the run adds (their rows are trained)
    tokenizer: Any | None
    tokenizer_note: str
    token_ids: str = ""  # which ids the template's markers and the config's tokens got (tokenizer at hand)


@dataclass(frozen=True)
class Fix:
    """A change that makes the run fit, with its expected speed (plan/speed.py)."""

    changes: dict[str, Any]
    estimate: MemoryEstimate
    seconds_per_token: float = 0.0
    offloads: bool = False  # weights or optimizer states in CPU memory
    also: tuple[str, ...] = ()  # what else it changes, besides memory and speed
    slowdown: float = 1.0  # expected time per trained token over the fastest proposal's

    def as_overrides(self) -> str:
        def value(v: Any) -> str:
            return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

        return " ".join(f"--{k} {_shown_path(v) if k == 'deepspeed' and v else value(v)}"
                        for k, v in self.changes.items())  # fmt: skip


@dataclass(frozen=True)
class Plan:
    cfg: Config
    gpus: int
    gpu_memory: int
    device: str
    runtime: RuntimeSettings  # `auto` settings resolved for the machine planned for
    model: ModelFacts
    data: DataPlan
    memory: MemoryEstimate
    fixes: tuple[Fix, ...]  # changes that would make it fit, fastest first, offload last
    auto: tuple[str, ...] = ()  # what `auto` memory settings became, and why

    @property
    def fix(self) -> Fix | None:
        return self.fixes[0] if self.fixes else None

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory

    @property
    def tight(self) -> bool:
        return self.fits and self.memory.total > (1 - HEADROOM_WARNING) * self.gpu_memory


def _local_tokenizer(cfg: Config) -> tuple[Any | None, str]:
    """(the LoadedTokenizer, a note) when the tokenizer is on this machine (a directory, or a hub id in the
    Hugging Face cache); hub ids are not fetched for a plan."""
    from dolphin_train.plan.architectures import cached_hub_file

    source = cfg.tokenizer_config or cfg.base_model
    if not Path(source).is_dir() and cached_hub_file(source, "tokenizer_config.json") is None:
        return None, f"tokenizer {source!r} not on this machine: `tokens` counted as new"
    from dolphin_train.model.tokenizer import load_tokenizer

    return load_tokenizer(cfg), f"tokenizer {source}"


def model_facts(cfg: Config, loaded: Any | None = None) -> ModelFacts:
    """Shapes and vocabulary; `loaded` is the run's LoadedTokenizer when training calls this."""
    from dolphin_train.model.load import embedding_rows
    from dolphin_train.model.tokenizer import token_ids_said
    from dolphin_train.plan.architectures import model_config_for_plan, rows_after_added_tokens, text_config

    config, source = model_config_for_plan(cfg)
    note = "the run's tokenizer"
    if loaded is None:
        loaded, note = _local_tokenizer(cfg)
    tokenizer, new_ids = (loaded.tokenizer, loaded.new_token_ids) if loaded is not None else (None, [])
    said = token_ids_said(loaded, cfg) if loaded is not None else ""

    if tokenizer is not None:
        rows = embedding_rows(int(text_config(config).vocab_size), len(tokenizer), cfg.resize_token_embeddings_to_32x)
    else:  # tokens renamed by added_tokens_overrides take no new row
        overrides = cfg.added_tokens_overrides or {}
        added = [t for t in cfg.tokens if t not in overrides.values()]
        rows = rows_after_added_tokens(config, len(added), cfg.resize_token_embeddings_to_32x)
        new_ids = [*sorted(overrides), *range(rows - len(added), rows)] if added else sorted(overrides)
    return ModelFacts(config, source, rows, list(new_ids), tokenizer, note, said)


def planned_runtime(cfg: Config, gpus: int, device: str, gpu_memory: int | None = None,
                    liger: bool | None = None) -> RuntimeSettings:  # fmt: skip
    """`auto` settings as training will resolve them on the machine planned for (`liger`: Machine.planned)."""
    return resolve_runtime(cfg, Machine.planned(device, gpus, gpu_memory, liger))


def plan_memory(cfg: Config, facts: ModelFacts, runtime: RuntimeSettings) -> MemoryEstimate:
    return estimate_memory(cfg, runtime, facts.config, vocab_rows=facts.vocab_rows, new_token_ids=facts.new_token_ids)


def resolve_auto_settings(
    cfg: Config, facts: ModelFacts, runtime: RuntimeSettings, budget: int, rows: int | None = None
) -> tuple[AutoChoice, MemoryEstimate | None]:
    """`auto` memory settings decided for `budget` bytes per device, as training decides them at launch, and
    the estimate for the choice (None when the config has no `auto` setting). `rows`: training rows, when
    known."""
    if not cfg.has_auto_memory_settings:
        return AutoChoice(cfg, (), True), None
    memory, _ = measure_model(cfg, runtime, facts.config, vocab_rows=facts.vocab_rows,
                              new_token_ids=facts.new_token_ids)  # fmt: skip
    choice = resolve_for_runtime(cfg, runtime, memory, budget, rows)
    return choice, memory.estimate(choice.cfg)


def make_plan(cfg: Config, gpus: int, gpu_memory: int, device: str = "cuda", liger: bool | None = None) -> Plan:
    facts = model_facts(cfg)
    runtime = planned_runtime(cfg, gpus, device, gpu_memory, liger)
    rows = None
    if cfg.has_auto_memory_settings:  # the training rows bound the micro-batch
        rows = plan_data(cfg.model_copy(update={"micro_batch_size": 1}), facts.tokenizer, gpus).train_rows
    auto, chosen = resolve_auto_settings(cfg, facts, runtime, gpu_memory, rows)
    cfg = auto.cfg
    data = plan_data(cfg, facts.tokenizer, gpus)
    reasons = auto.reasons
    per_gpu = -(-data.train_rows // gpus) if data.train_rows else None
    if per_gpu is not None and cfg.micro_batch_size != "auto" and cfg.micro_batch_size > per_gpu:
        # A micro-batch holds at most the rows a GPU sees: planned as the run will do it, and the suggestions
        # start from there (not from an effective batch no dataset fills).
        reasons = (*reasons, f"micro_batch_size: {cfg.micro_batch_size} is more than the {per_gpu} rows each GPU "
                   f"sees per epoch: planned as {per_gpu} (set micro_batch_size: {per_gpu} or lower)")  # fmt: skip
        cfg = cfg.model_copy(update={"micro_batch_size": per_gpu})
        chosen = None
    memory = chosen or plan_memory(cfg, facts, runtime)
    fixes = find_fixes(cfg, facts, runtime, gpu_memory) if memory.total > gpu_memory else ()
    return Plan(cfg, gpus, gpu_memory, device, runtime, facts, data, memory, fixes, reasons)


# Optimizers whose states an 8-bit AdamW would shrink (full fine-tuning).
WIDE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit")
# (gradient_checkpointing, gradient_checkpointing_layers), least recomputation first.
CHECKPOINTING_OPTIONS = ((False, 1), (True, 4), (True, 2), (True, 1))
IN_BACKWARD = {"bfloat16": True, "optimizer": "adamw_torch_8bit", "optimizer_in_backward": True,
               "gradient_accumulation_steps": 1, "max_grad_norm": 0}  # fmt: skip


def _routes(cfg: Config, gpus: int) -> list[dict[str, Any]]:
    """Ways to run the same training in less memory, each then tried with the levers (checkpointing, a
    smaller micro-batch); adapters, which change what is trained, come after (tried only when nothing else fits)."""
    eight_bit = {"optimizer": "adamw_8bit"} if not cfg.adapter and cfg.optimizer in WIDE_OPTIMIZERS else {}
    routes: list[dict[str, Any]] = [{}, eight_bit] if eight_bit else [{}]
    if gpus == 1 and not cfg.adapter and not cfg.optimizer_in_backward:
        # One GPU: bf16 weights updated in the backward pass, gradients never all held (docs/one-gpu.md).
        unset = {k: None for k in ("deepspeed", "batch_size") if getattr(cfg, k) is not None}
        routes.append({**unset, **IN_BACKWARD})
    stage = plan_sharding(cfg, gpus).deepspeed_stage if cfg.deepspeed else None
    zero3, offload = DEEPSPEED_DIR / "zero3_bf16.json", DEEPSPEED_DIR / "zero3_bf16_cpuoffload_all.json"
    if gpus > 1 and not cfg.fsdp and (stage is None or stage < 3) and zero3.exists():
        routes.append({**eight_bit, "deepspeed": str(zero3)})
    if not cfg.fsdp and offload.exists():
        routes.append({"deepspeed": str(offload)})  # its optimizer runs on the CPU: DeepSpeed's own
    if not cfg.adapter:
        routes += [{"adapter": "lora"}, {"adapter": "qlora", "load_in_4bit": True}]
    return routes


def _levers(cfg: Config, rows_per_step: int) -> list[dict[str, Any]]:
    """Checkpointing and micro-batch settings to try on a route, as changes to `cfg`; `rows_per_step`: the
    effective batch of the config as written, which the micro-batch alone makes up without accumulation."""
    if cfg.checkpointing:
        checkpointing = [(True, cfg.gradient_checkpointing_layers), (True, 1)]
    else:
        checkpointing = list(CHECKPOINTING_OPTIONS)
    micro = int(cfg.micro_batch_size)
    # Micro-batches that divide the effective batch, accumulation making up the rest (none in the backward pass).
    largest = rows_per_step if cfg.optimizer_in_backward else micro
    batches = [(m, 1 if cfg.optimizer_in_backward else rows_per_step // m)
               for m in range(largest, 0, -1) if rows_per_step % m == 0]  # fmt: skip
    levers = []
    for on, every in dict.fromkeys(checkpointing):
        for m, a in batches:
            lever: dict[str, Any] = {"micro_batch_size": m, "gradient_accumulation_steps": a}
            if (on, every) != (cfg.checkpointing, cfg.gradient_checkpointing_layers):  # keeps `offload` otherwise
                lever |= {"gradient_checkpointing": on, "gradient_checkpointing_layers": every}
            levers.append(lever)
    return levers


def _changed(cfg: Config, changes: dict[str, Any]) -> Config:
    return Config.model_validate({**cfg.model_dump(by_alias=True), **changes})


def _what_else_changes(cfg: Config, changed: Config) -> tuple[str, ...]:
    said = []
    before = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    after = changed.micro_batch_size * changed.gradient_accumulation_steps
    if before != after:
        said.append(f"batch {after} rows per optimizer step per GPU (was {before}): check the learning rate")
    if changed.optimizer_in_backward and not cfg.optimizer_in_backward:
        said.append("each weight updated in the backward pass")
    if changed.bfloat16 and not cfg.bfloat16:
        said.append("bf16 weights, no float32 master copy")
    if not changed.max_grad_norm and cfg.max_grad_norm:
        said.append("no gradient clipping")
    if changed.adapter and not cfg.adapter:
        said.append(f"trains a {'QLoRA' if changed.load_in_4bit else 'LoRA'} adapter, not every weight")
    return tuple(said)


def _best_on_route(
    cfg: Config, route: dict[str, Any], facts: ModelFacts, runtime: RuntimeSettings, gpu_memory: int
) -> Fix | None:
    """The route's best setting that fits (the model measured once, its levers then arithmetic): one that is
    not tight (the estimate is close, not exact), then the effective batch as written or the closest to it (in
    the backward pass nothing accumulates), then the fastest, then the largest micro-batch."""
    from pydantic import ValidationError

    from dolphin_train.plan.speed import seconds_per_token

    try:
        base = _changed(cfg, route)
    except ValidationError as exc:
        log.debug("plan: skipping %s: %s", route, exc)
        return None
    memory, _ = measure_model(base, runtime, facts.config, vocab_rows=facts.vocab_rows,
                              new_token_ids=facts.new_token_ids)  # fmt: skip
    rows_per_step = int(cfg.micro_batch_size) * cfg.gradient_accumulation_steps
    best: tuple[tuple[bool, int, float, int], Fix] | None = None
    for lever in _levers(base, rows_per_step):
        estimate = memory.estimate(base.model_copy(update=lever))
        if estimate.total > gpu_memory:
            continue
        changes = {k: v for k, v in {**route, **lever}.items() if getattr(cfg, k) != v}
        try:
            changed = _changed(cfg, changes)
        except ValidationError:
            continue
        speed = seconds_per_token(changed, estimate, runtime.world_size)
        offloads = estimate.sharding.offload_params or estimate.sharding.offload_optimizer
        fix = Fix(changes, estimate, speed, offloads, _what_else_changes(cfg, changed))
        tight = estimate.total > (1 - HEADROOM_WARNING) * gpu_memory
        batch_change = abs(changed.micro_batch_size * changed.gradient_accumulation_steps - rows_per_step)
        # Speeds equal but for rounding (no offload: the micro-batch's size does not change it) count as equal.
        key = (tight, batch_change, float(f"{speed:.6g}"), -changed.micro_batch_size)
        if best is None or key < best[0]:
            best = (key, fix)
    return best[1] if best else None


def find_fixes(cfg: Config, facts: ModelFacts, runtime: RuntimeSettings, gpu_memory: int) -> tuple[Fix, ...]:
    """The changes that would make the run fit, one per route, fastest first and offload last, each with its
    expected slowdown against the first. An adapter is proposed only when no full fine-tuning setting fits."""
    routes = _routes(cfg, runtime.world_size)
    same_method = [r for r in routes if "adapter" not in r]
    for tried in (same_method, [r for r in routes if "adapter" in r]):
        found = [f for route in tried if (f := _best_on_route(cfg, route, facts, runtime, gpu_memory)) is not None]
        if found:
            break
    fixes = sorted(found, key=lambda f: (f.offloads, f.seconds_per_token))
    if not fixes:
        return ()
    fastest = min(f.seconds_per_token for f in fixes)
    return tuple(replace(f, slowdown=f.seconds_per_token / fastest) for f in fixes)


def find_fix(cfg: Config, facts: ModelFacts, runtime: RuntimeSettings, gpu_memory: int) -> Fix | None:
    """The fastest change that would make the run fit (None when none does)."""
    fixes = find_fixes(cfg, facts, runtime, gpu_memory)
    return fixes[0] if fixes else None


def _gib(n: int) -> str:
    return f"{n / GiB:,.1f}" if n >= GiB else f"{n / GiB:.2f}"


def _shown_path(path: str) -> str:
    import os

    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def render(plan: Plan) -> list[Any]:
    """Rich renderables: the overview, the memory table, the verdict."""
    from rich.table import Table
    from rich.text import Text

    cfg, m, data = plan.cfg, plan.memory, plan.data
    where = f"{plan.gpus} x {plan.gpu_memory / 1e9:g} GB GPU" if plan.device == "cuda" else "the CPU"
    overview = Table(title=f"Plan: {cfg.base_model} on {where}", show_header=False)
    overview.add_column("what")
    overview.add_column("value")
    p = m.params
    shape = f"{plan.model.config.model_type}, {p.layers} layers, hidden {p.hidden_size}, vocabulary {p.vocab_size:,}"
    overview.add_row("model", f"{shape} (shapes: {plan.model.source}; {plan.model.tokenizer_note})")
    overview.add_row("parameters", f"{p.total:,} total, {p.trainable:,} trainable ({p.trainable / p.total:.2%})")
    batch = batch_shape(cfg, max(1, plan.gpus // cfg.cp_size))  # a context-parallel group shares its rows
    tokens = batch.micro_batch_size * tokens_per_device(cfg)  # on one GPU: its share under context parallelism
    per = "GPU" if cfg.cp_size == 1 else \
        f"context-parallel group of {cfg.cp_size} GPUs ({tokens_per_device(cfg):,} per GPU)"  # fmt: skip
    overview.add_row("batch", f"{batch.micro_batch_size} x {batch.sequence_len} tokens per {per}, "
                     f"{batch.rows_per_step} rows ({batch.tokens_per_step:,} tokens) per optimizer step")  # fmt: skip
    if data.known:
        label = "" if data.exact else "~"
        overview.add_row("data", f"{label}{data.conversations:,} conversations, {label}{data.tokens:,} tokens, "
                         f"{label}{data.train_rows:,} training rows")  # fmt: skip
        overview.add_row("steps", f"{label}{data.steps_per_epoch:,} per epoch, {label}{data.total_steps:,} in all "
                         f"({data.source})")  # fmt: skip
    else:
        overview.add_row("data / steps", data.source)
    if cfg.adapter:
        new = len(plan.model.new_token_ids)
        said = {"rows": f" + the {new} new tokens' embedding rows", "in full": " + embeddings in full",
                "rows and in full": f" + the {new} new tokens' input embedding rows, the head in full"}  # fmt: skip
        bits = ", 4-bit base" if cfg.load_in_4bit else ", 8-bit base" if cfg.load_in_8bit else ""
        overview.add_row("adapter", f"{cfg.adapter} r={cfg.lora_r}{bits}{said.get(m.params.embeddings_trained, '')}")
        if cfg.relora:
            overview.add_row("ReLoRA", f"merged into the base and restarted every {cfg.jagged_restart_steps} steps; "
                             "checkpoints also hold the float32 merged weights, the output is the merged model")
    if plan.model.token_ids:
        overview.add_row("tokens", plan.model.token_ids)
    overview.add_row("precision", m.precision + (", chunked cross-entropy" if m.chunked_loss else ""))
    overview.add_row("sharding", m.sharding.name)

    table = Table(title=f"Memory per {'GPU' if plan.device == 'cuda' else 'process'} at the peak ({m.peak_moment})")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("what it is")
    opt_note = f"{cfg.optimizer} states" + (
        " + float32 master weights" if m.sharding.deepspeed_stage is not None else ""
    )
    ckpt = "with" if cfg.checkpointing else "without"
    rows = [
        ("weights", m.weights, _weights_note(cfg, m)),
        ("gradients", m.gradients, "held at this moment" + _split(m.sharding.gradients)),
        ("optimizer", m.optimizer, opt_note + _split(m.sharding.optimizer)),
        ("activations", m.activations, f"{tokens:,} tokens {ckpt} gradient checkpointing (with: "
         f"{_gib(m.activations_with_checkpointing)}, without: {_gib(m.activations_without_checkpointing)})"),
        ("logits and loss", m.logits, _logits_note(m, tokens)),
        ("working memory", m.transient, _working_note(m)),
        ("runtime overhead", m.overhead, "CUDA context, communication buffers, allocator fragmentation"
         if plan.device == "cuda" else "autograd and Trainer bookkeeping"),
    ]  # fmt: skip
    for name, value, note in rows:
        table.add_row(name, _gib(value), note)
    table.add_row(
        "total", _gib(m.total), f"of {_gib(plan.gpu_memory)} GiB" if plan.device == "cuda" else "", style="bold"
    )
    auto = [Text(line, style="bold") for line in plan.auto]
    return [*auto, overview, table, verdict(plan)] + [Text(f"note: {n}") for n in m.notes]


def _split(ways: int) -> str:
    return f", / {ways} GPUs" if ways > 1 else ""


def _logits_note(m: MemoryEstimate, tokens: int) -> str:
    if m.chunked_loss:
        return "chunked cross-entropy: one chunk of logits at a time"
    return f"{tokens:,} x {m.params.vocab_size:,} logits and the float32 loss"


def _working_note(m: MemoryEstimate) -> str:
    parts = {
        "end of forward": "gathered shards",
        "start of backward": "recomputed layer (checkpointing), gathered shards",
        "end of backward": "recomputed layer, gathered shards, gradient buckets",
        "optimizer step": "optimizer-step temporaries, float32 gradient partition, gradient buckets",
    }
    return parts[m.peak_moment]


def _weights_note(cfg: Config, m: MemoryEstimate) -> str:
    if cfg.load_in_4bit:
        kind = f"4-bit NF4 linear layers, the rest in {m.precision}"
    elif cfg.load_in_8bit:
        kind = f"8-bit linear layers, the rest in {m.precision}"
    elif cfg.bfloat16:
        kind = "bf16 weights, no float32 master copy"
    elif cfg.float16:
        kind = "fp16 weights, no float32 master copy, no loss scaler"
    elif cfg.adapter and cfg.loftq is not None:  # LoftQ's quantised values, held at LoRA's precision
        kind = f"frozen {m.precision} base ({cfg.loftq.loftq_bits}-bit LoftQ values) + adapter"
    elif cfg.adapter:
        kind = f"frozen {m.precision} base + adapter"
    elif m.sharding.deepspeed_stage is not None:
        kind = f"{m.precision} (DeepSpeed keeps the float32 master copy with the optimizer)"
    else:
        kind = "float32 master weights (mixed precision autocasts)" if m.precision != "fp32" else "float32"
    return kind + _split(m.sharding.weights)


def verdict(plan: Plan) -> Any:
    from rich.text import Text

    if plan.device != "cuda":
        return Text(f"Estimated peak: {_gib(plan.memory.total)} GiB of process memory.")
    spare = plan.gpu_memory - plan.memory.total
    if plan.fits and not plan.tight:
        return Text(f"Fits: {_gib(spare)} GiB to spare per GPU.", style="bold green")
    if plan.fits:
        return Text(f"Fits, but tight: {_gib(spare)} GiB to spare per GPU; a longer batch or a memory spike "
                    "may not fit.", style="bold yellow")  # fmt: skip
    text = Text(f"Does not fit: {_gib(-spare)} GiB over per GPU.", style="bold red")
    if not plan.fixes:
        text.append("\nNo setting tried makes it fit: use more or larger GPUs, or a shorter sequence_len.")
        return text
    text.append("\nWould fit with any of these, fastest first (expected time per trained token; offload last):")
    for i, fix in enumerate(plan.fixes, 1):
        text.append(f"\n  {i}. {fix.as_overrides()}", style="bold")
        also = f". Also: {'; '.join(fix.also)}" if fix.also else ""
        tight = " (tight)" if fix.estimate.total > (1 - HEADROOM_WARNING) * plan.gpu_memory else ""
        text.append(f"\n     {_gib(fix.estimate.total)} GiB{tight}; {_speed_said(fix)}{also}")
    return text


def _speed_said(fix: Fix) -> str:
    """The expected slowdown against the fastest proposal, and where it comes from."""
    where = [w for w, on in (("parameters", fix.estimate.sharding.offload_params),
                             ("optimizer", fix.estimate.sharding.offload_optimizer)) if on]  # fmt: skip
    offloaded = f" ({' and '.join(where)} offloaded to CPU memory)" if where else ""
    if fix.slowdown < 1.005:
        return "the fastest" + offloaded
    return f"expected {fix.slowdown:.1f}x the time per trained token of 1 (+{fix.slowdown - 1:.0%}){offloaded}"
