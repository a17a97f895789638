"""dolphin-train: config-driven supervised fine-tuning of chat LLMs.

Importing the package must stay cheap (no torch): `dolphin-train --help` relies on it.
"""

__version__ = "0.1.0"
