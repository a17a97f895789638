"""Config stage: YAML → validated, frozen `Config`; `auto` values resolved into `RuntimeSettings`."""

from dolphin_train.config.load import load_config
from dolphin_train.config.schema import Config

__all__ = ["Config", "load_config"]
