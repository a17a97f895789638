"""`plan --max-context`: the longest `sequence_len` a config fits on the machine planned for.

The same estimate as the plan's, at each length tried: the meta-device model is built once and traced
again at each length (the trace is what depends on it). With `auto` memory settings the plan's choice is
made at each length as at launch, with one row per micro-batch (the longest row is what is asked); without,
the config's own settings are kept. The search doubles from the config's `sequence_len` until a length does
not fit (or halves until one does), then bisects to a multiple of `STEP` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from dolphin_train.config.schema import Config
from dolphin_train.plan.auto import resolve_for_runtime
from dolphin_train.plan.memory import (
    MeasurableModel,
    MemoryEstimate,
    measurable_model,
    memory_model_at,
    tokens_per_device,
)

STEP = 1024  # lengths are searched in multiples of this
LONGEST = 2**24  # 16M tokens: past what any run would ask


@dataclass(frozen=True)
class ContextFit:
    sequence_len: int
    cfg: Config  # with `auto` settings as chosen at that length
    estimate: MemoryEstimate
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class LongestContext:
    longest: ContextFit | None  # None: not even STEP tokens fit
    first_too_long: int | None  # the shortest length tried that does not fit (None: LONGEST fits)


class _Fitter:
    def __init__(self, cfg: Config, facts: object, runtime: object, budget: int) -> None:
        single_row: dict[str, object] = {}
        if cfg.micro_batch_size == "auto":  # the longest row is asked for: one per micro-batch
            single_row = {"micro_batch_size": 1, "gradient_accumulation_steps": cfg.batch_size or 1}
        self.cfg = cfg.model_copy(update=single_row)
        self.runtime, self.budget = runtime, budget
        facts_kw = {"vocab_rows": facts.vocab_rows, "new_token_ids": facts.new_token_ids}
        build = self.cfg.model_copy(update={"tiled_mlp": False}) if cfg.tiled_mlp == "auto" else self.cfg
        self.model: MeasurableModel = measurable_model(build, runtime, facts.config, **facts_kw)
        self.tiled: MeasurableModel | None = None
        if cfg.tiled_mlp == "auto":
            tiled = self.cfg.model_copy(update={"tiled_mlp": True})
            self.tiled = measurable_model(tiled, runtime, facts.config, **facts_kw)

    def at(self, length: int) -> tuple[bool, ContextFit]:
        cfg = self.cfg.model_copy(update={"sequence_len": length})
        memory = memory_model_at(self.model, self.tiled, tokens_per_device(cfg))
        if cfg.has_auto_memory_settings:
            choice = resolve_for_runtime(cfg, self.runtime, memory, self.budget)
            estimate = memory.estimate(choice.cfg)
            return choice.fits, ContextFit(length, choice.cfg, estimate, choice.reasons)
        estimate = memory.estimate(cfg)
        return estimate.total <= self.budget, ContextFit(length, cfg, estimate, ())


def longest_context(cfg: Config, gpus: int, gpu_memory: int, device: str = "cuda",
                    liger: bool | None = None) -> LongestContext:  # fmt: skip
    from dolphin_train.plan.report import model_facts, planned_runtime

    facts = model_facts(cfg)
    runtime = planned_runtime(cfg, gpus, device, gpu_memory, liger)
    fitter = _Fitter(cfg, facts, runtime, gpu_memory)
    start = max(STEP, cfg.sequence_len // STEP * STEP)
    fits, fit = fitter.at(start)
    good, bad = (fit, None) if fits else (None, start)
    length = start
    while fits and length < LONGEST:  # double until a length does not fit
        length = min(LONGEST, length * 2)
        fits, fit = fitter.at(length)
        good, bad = (fit, bad) if fits else (good, length)
    while good is None and length > STEP:  # or halve until one does
        length = max(STEP, length // 2 // STEP * STEP)
        fits, fit = fitter.at(length)
        good, bad = (fit, bad) if fits else (good, length)
    if good is None or bad is None:
        return LongestContext(good, bad)
    low, high = good.sequence_len // STEP, bad // STEP
    while high - low > 1:  # bisect between a length that fits and one that does not
        middle = (low + high) // 2
        fits, fit = fitter.at(middle * STEP)
        if fits:
            low, good = middle, fit
        else:
            high = middle
    return LongestContext(good, high * STEP)
