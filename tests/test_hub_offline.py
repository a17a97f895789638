"""Hub ids without the network: a dataset and a model that live only in a Hugging Face cache, filled here in
the layout `huggingface_hub` writes (`datasets--org--name/` and `models--org--name/`, each with
`snapshots/<revision>/` and `refs/main`), read with HF_HUB_OFFLINE=1 as a user on an offline cluster would.

The commands run in a subprocess: the cache location and offline flag are read once, when the Hugging Face
libraries are imported, as they are when `dolphin-train` starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, sharegpt, write_config

pytestmark = pytest.mark.slow
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(hub: Path, kind: str, repo_id: str) -> Path:
    """An empty snapshot of `repo_id` in the cache, `main` pointing at it."""
    repo = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    return snapshot


def _rows(prefix: str, n: int) -> str:
    return "".join(json.dumps(sharegpt(("human", f"{prefix} {i}?"), ("gpt", f"{prefix} answer {i}."))) + "\n"
                   for i in range(n))  # fmt: skip


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> dict[str, str]:
    """A Hugging Face home holding the dataset `acme/chat` (two configurations, an extra file) and the model
    `acme/tiny-chat` (the repository's tiny tokenizer and model config), and the environment to read it."""
    home = tmp_path_factory.mktemp("hf_home")
    data = _cache_repo(home / "hub", "dataset", "acme/chat")
    (data / "data").mkdir()
    (data / "data" / "train.jsonl").write_text(_rows("train", 10))
    (data / "data" / "small.jsonl").write_text(_rows("small", 3))
    (data / "extra").mkdir()
    (data / "extra" / "more.jsonl").write_text(_rows("more", 4))
    (data / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.jsonl\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: data/small.jsonl\n---\n"
    )
    model = _cache_repo(home / "hub", "model", "acme/tiny-chat")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "configs/tiny/tokenizer" / name, model / name)
    shutil.copy(REPO / "configs/tiny/model/config.json", model / "config.json")
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO / "src")}  # fmt: skip


def _config(tmp_path: Path, **keys) -> Path:
    cfg = {
        "base_model": "acme/tiny-chat",
        "train_from_scratch": True,
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "datasets": [
            {"path": "acme/chat", "type": "sharegpt", "split": "train[:20%]"},
            {"path": "acme/chat", "type": "sharegpt", "name": "small"},
            {"path": "acme/chat", "type": "sharegpt", "data_files": "extra/more.jsonl"},
        ],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 256,
        "bf16": False,
        **keys,
    }
    return write_config(tmp_path / "config.yml", cfg)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dolphin_train", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_hub_dataset_and_tokenizer_from_the_cache(offline: dict[str, str], tmp_path: Path) -> None:
    """A sliced split (2 of 10 rows), a named configuration (3 rows) and `data_files` (4 rows), tokenized with
    the cached model's tokenizer."""
    _run(offline, "preprocess", str(_config(tmp_path)))
    [entry] = [p for p in (tmp_path / "prepared").iterdir() if (p / "report.json").exists()]
    report = json.loads((entry / "report.json").read_text())
    assert report["rows_read"] == {"acme/chat (split=train[:20%])": 2, "acme/chat (name=small)": 3,
                                   "acme/chat (data_files=extra/more.jsonl)": 4}  # fmt: skip
    assert report["kept"] == 9


def test_hub_model_config_for_the_plan_from_the_cache(offline: dict[str, str], tmp_path: Path) -> None:
    done = _run(offline, "plan", str(_config(tmp_path)), "--device", "cpu", "--gpu-memory", "8GB")
    assert "acme/tiny-chat (config.json in the Hugging Face cache" in done.stdout, done.stdout
    assert "tokenizer acme/tiny-chat" in done.stdout, done.stdout


def test_an_uncached_hub_id_fails_with_a_message(offline: dict[str, str], tmp_path: Path) -> None:
    cfg = _config(tmp_path, datasets=[{"path": "acme/missing", "type": "sharegpt"}])
    done = subprocess.run([sys.executable, "-m", "dolphin_train", "preprocess", str(cfg)], env=offline,
                          capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert "cannot load the hub dataset 'acme/missing'" in done.stderr
