"""The config schema: the one place where every key is named, typed, defaulted and documented.

Key names follow axolotl so that existing configs (the Dolphin recipes among them) load unchanged.
Each field's description is its documentation: the config reference (docs/reference/) is generated from it
(`scripts/gen_config_reference.py`, checked by a test).

A field marked `unsupported` is known (so a config using it gets a precise message instead of "unknown
key"), but setting it to anything other than its default fails with "not supported yet".

The keys are declared by section, one file each under `config/sections/` (see its `__init__`), each with the
checks of a single key and the values derived from its own keys; `Config` here composes them into the one
frozen model the rest of the code uses, with the checks across sections (`config/checks.py`). Every name the
other modules use is importable from here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from dolphin_train.config.checks import CrossSectionChecks
from dolphin_train.config.keys import SECTIONS, key
from dolphin_train.config.sections.adapters import AdapterKeys, LoftQSettings, LoRAKernelKeys, PeftSettings
from dolphin_train.config.sections.compat import CompatKeys, DeferredInitKeys
from dolphin_train.config.sections.data import (
    FALLBACK_PREFIX,
    TEMPLATE_NAMES,
    TOKENIZER_DEFAULT,
    DataKeys,
    DatasetConfig,
)
from dolphin_train.config.sections.distributed import FSDP_STRATEGIES, DistributedKeys
from dolphin_train.config.sections.kernels import (
    ATTENTION_NAMES,
    ATTN_IMPLEMENTATIONS,
    CCE_PLUGIN,
    FLEX_COMPILE_KEYS,
    FLEX_COMPILE_MODES,
    KNOWN_PLUGINS,
    LIGER_PLUGIN,
    SPARSE_PLUGIN,
    KernelKeys,
    unfrozen_pattern,
)
from dolphin_train.config.sections.model import BNB_CONFIG_VALUES, BNB_TOP_LEVEL, ModelKeys, SpecialTokens
from dolphin_train.config.sections.tracking import DEFAULT_CAUSAL_LM_METRICS, CausalLMMetric, LoggingKeys
from dolphin_train.config.sections.training import (
    IN_BACKWARD_OPTIMIZERS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    RELORA_OPTIMIZERS,
    SparseFinetuning,
    TrainingKeys,
    pruning_targets,
)

__all__ = [
    "ATTENTION_NAMES",
    "ATTN_IMPLEMENTATIONS",
    "BNB_CONFIG_VALUES",
    "BNB_TOP_LEVEL",
    "CCE_PLUGIN",
    "DEFAULT_CAUSAL_LM_METRICS",
    "FALLBACK_PREFIX",
    "FLEX_COMPILE_KEYS",
    "FLEX_COMPILE_MODES",
    "FSDP_STRATEGIES",
    "IN_BACKWARD_OPTIMIZERS",
    "KNOWN_PLUGINS",
    "LIGER_PLUGIN",
    "LR_SCHEDULERS",
    "OPTIMIZERS",
    "RELORA_OPTIMIZERS",
    "SECTIONS",
    "SPARSE_PLUGIN",
    "TEMPLATE_NAMES",
    "TOKENIZER_DEFAULT",
    "CausalLMMetric",
    "Config",
    "DatasetConfig",
    "LoftQSettings",
    "PeftSettings",
    "SparseFinetuning",
    "SpecialTokens",
    "documented_fields",
    "key",
    "pruning_targets",
    "unfrozen_pattern",
]


class Config(
    # Last section first: pydantic orders the fields from the last base to the first (the reversed MRO), and
    # that order is the reference's and the error messages'. ModelKeys' fields come first, DistributedKeys' last.
    DistributedKeys,
    LoggingKeys,
    TrainingKeys,
    DataKeys,
    DeferredInitKeys,
    LoRAKernelKeys,
    CompatKeys,
    KernelKeys,
    AdapterKeys,
    ModelKeys,
    CrossSectionChecks,
):
    """A whole run. Immutable once loaded; values derived from it live in `RuntimeSettings` and plans."""

    model_config = ConfigDict(defer_build=False)  # built at import, unlike its sections (keys.Section)

    @model_validator(mode="before")
    @classmethod
    def _fsdp_options_from_config(cls, data: Any) -> Any:
        """axolotl's `fsdp_config` keys that are `fsdp` options in transformers (which would not read them in
        `fsdp_config`), and `fsdp_version` with no `fsdp` list: FSDP on, as axolotl reads it."""
        if not isinstance(data, dict) or not isinstance(data.get("fsdp_config"), dict):
            return data
        settings = {k.removeprefix("fsdp_"): v for k, v in data["fsdp_config"].items()}
        new_spelling = data.get("fsdp") is None and data.get("fsdp_version") is not None
        if data.get("fsdp") is None and not new_spelling:
            return data
        if not new_spelling and not {"sharding_strategy", "offload_params"} & settings.keys():
            return data  # nothing to translate
        options = data["fsdp"] if isinstance(data.get("fsdp"), list) else str(data.get("fsdp") or "").split()
        strategy = str(settings.pop("sharding_strategy", "")).lower()
        chosen = [o for o in options if o in FSDP_STRATEGIES]
        if strategy and chosen and strategy not in chosen:
            raise ValueError(f"fsdp_config's sharding_strategy ({strategy}) and fsdp ({chosen[0]}) disagree: set one")
        if new_spelling:
            reshard = settings.get("reshard_after_forward") is not False
            options = [strategy or ("full_shard" if reshard else "shard_grad_op"), "auto_wrap"]
        elif strategy and not chosen:
            options = [strategy, *options]
        if settings.pop("offload_params", False) and "offload" not in options:
            options = [*options, "offload"]
        if data.get("fsdp_version") is not None:
            settings.setdefault("version", data["fsdp_version"])
        return {**data, "fsdp": options, "fsdp_config": settings}

    @model_validator(mode="before")
    @classmethod
    def _accumulation_from_batch_size(cls, data: Any) -> Any:
        """axolotl's reading of `batch_size` with a fixed micro-batch and no `gradient_accumulation_steps`."""
        if not isinstance(data, dict) or data.get("gradient_accumulation_steps") is not None:
            return data
        batch, micro = data.get("batch_size"), data.get("micro_batch_size", 1)
        whole = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (batch, micro))
        if whole and batch % micro == 0:
            return {**data, "gradient_accumulation_steps": batch // micro}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = self._cross_section_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def chunked_loss_choice(self) -> bool | None:
        """`chunked_cross_entropy`, or the CutCrossEntropy plugin's request for the same thing."""
        if self.chunked_cross_entropy is not None:
            return self.chunked_cross_entropy
        if self.cut_cross_entropy or (self.cut_cross_entropy is None and CCE_PLUGIN in (self.plugins or [])):
            return True
        return None

    @property
    def liger_kernel_config(self) -> dict[str, bool]:
        """The Liger kernels the `liger_*` keys pick, named as transformers' `liger_kernel_config` takes them."""
        glu = self.liger_glu_activation if self.liger_glu_activation is not None else self.flash_attn_fuse_mlp or None
        norm = self.flash_attn_rms_norm or self.fused_attn_kernel
        chosen = {
            "rope": self.liger_rope if self.liger_rope is not None else self.fused_attn_kernel or None,
            "rms_norm": self.liger_rms_norm if self.liger_rms_norm is not None else norm or None,
            "layer_norm": self.liger_layer_norm,
            "swiglu": glu,
            "geglu": glu,
            "cross_entropy": self.liger_cross_entropy,
            "fused_linear_cross_entropy": self.liger_fused_linear_cross_entropy,
        }
        return {k: v for k, v in chosen.items() if v is not None}

    @property
    def micro_batch_size_for_eval(self) -> int:
        return self.eval_batch_size or self.micro_batch_size


def documented_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Config keys (by their YAML name) mapped to their pydantic field info."""
    return {(info.alias or name): info for name, info in model.model_fields.items()}
