"""LISA (layerwise importance sampled AdamW, arXiv:2403.17919): full fine-tuning that trains only a few decoder
layers at a time, drawn at random every few steps, with the embeddings, final norm and output head always trained.

A layer leaves training by `requires_grad = False`: its gradient stays None, so the optimizer (created before the
first draw, over every parameter) skips it, weight decay included, and keeps its moments for when it is drawn again.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
from transformers import TrainerCallback

from dolphin_train.config.schema import Config
from dolphin_train.errors import ConfigError
from dolphin_train.model.layers import decoder_layers

log = logging.getLogger(__name__)

DEFAULT_STEP_INTERVAL = 20


def lisa_layers(cfg: Config, model: Any) -> Any:
    """The list LISA draws from: `lisa_layers_attribute`, else the model's decoder layers."""
    if not cfg.lisa_layers_attribute:
        return decoder_layers(model)
    try:
        return functools.reduce(getattr, cfg.lisa_layers_attribute.split("."), model)
    except AttributeError:
        problem = f"lisa_layers_attribute: {type(model).__name__} has no {cfg.lisa_layers_attribute!r}"
        raise ConfigError([problem]) from None


class LayerwiseSampling(TrainerCallback):
    """Draws `n_layers` of `layers` at the start of every `interval`-th optimizer step (and at the start of
    training, so a run resumed between two draws has the layers the first run had)."""

    def __init__(self, layers: Any, n_layers: int, interval: int, seed: int) -> None:
        if n_layers > len(layers):
            raise ConfigError([f"lisa_n_layers: {n_layers} is more than the model's {len(layers)} layers"])
        self.layers, self.n_layers, self.interval, self.seed = layers, n_layers, interval, seed
        self.active: list[int] = []

    @classmethod
    def from_config(cls, cfg: Config, model: Any) -> LayerwiseSampling:
        interval = cfg.lisa_step_interval or DEFAULT_STEP_INTERVAL
        sampling = cls(lisa_layers(cfg, model), cfg.lisa_n_layers or 0, interval, cfg.seed)
        log.info("LISA: %d of %d layers trained at a time, drawn every %d steps", sampling.n_layers,
                 len(sampling.layers), interval)  # fmt: skip
        return sampling

    def draw(self, step: int) -> list[int]:
        """The layers trained from `step` until the next draw: a function of the seed and the draw's number."""
        rng = np.random.default_rng([self.seed, step // self.interval])
        return sorted(int(i) for i in rng.choice(len(self.layers), self.n_layers, replace=False))

    def _switch(self, step: int) -> None:
        self.active = self.draw(step)
        for index, layer in enumerate(self.layers):
            layer.requires_grad_(index in self.active)
        log.debug("LISA: layers %s trained from step %d", self.active, step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._switch(state.global_step)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step % self.interval == 0:
            self._switch(state.global_step)
        return control
