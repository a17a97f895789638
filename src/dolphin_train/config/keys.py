"""What every section of the schema is built from: `key()`, the documented field; `Strict`, the base of
every settings model (frozen, no unknown keys); `Section`, the base of the section classes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The reference's sections, in its order: each key names its own with `key(..., section=...)`.
SECTIONS = ("model", "data", "training", "distributed", "logging")


def key(
    default: Any = None,
    doc: str = "",
    section: str = "training",
    unsupported: bool = False,
    alternative: str | None = None,
    **kw: Any,
):
    """A documented config key. `section` groups it in the reference; `unsupported` marks keys that only take
    their default: planned ones, or, with `alternative` (what to use instead), axolotl keys we do not carry."""
    extra: dict[str, Any] = {"section": section}
    if unsupported:
        extra["unsupported"] = True
    if alternative:
        extra["alternative"] = alternative
    return Field(default, description=doc, json_schema_extra=extra, **kw)


class Strict(BaseModel):
    # allow_inf_nan: `.inf` or `.nan` for a float key (a learning rate, a ratio) is always a mistake.
    model_config = ConfigDict(
        frozen=True, extra="forbid", protected_namespaces=(), populate_by_name=True, allow_inf_nan=False
    )


class Section(Strict):
    """The base of the section classes under `config/sections/`. Only `Config`, which composes them, validates
    configs, so the sections' own validators are not built (building them would only slow every import)."""

    model_config = ConfigDict(defer_build=True)
