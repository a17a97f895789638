"""DeepSpeed ZeRO-3 over 2 CPU processes (gloo), all with the chunked loss: full fine-tuning follows the
single-process loss curve and saves a consolidated model; QLoRA trains and saves a whole adapter; the
Dolphin 2.9 recipe runs as shipped with a miniature model and data."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed"),
]
ZERO3 = str(REPO / "deepspeed_configs/zero3.json")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _torchrun(config: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dolphin_train",
                 str(config)])  # fmt: skip


def _saved_base(tmp_path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model")).save_pretrained(base)
    return base


def _losses(out: Path) -> list[float]:
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


SGD_STEP = {"max_steps": 1, "save_steps": 1, "optimizer": "sgd", "learning_rate": 100.0, "max_grad_norm": 0.0,
            "weight_decay": 0.0, "sample_packing": False}  # fmt: skip


def test_zero3_first_step_applies_the_single_process_gradient(tmp_path: Path) -> None:
    """One plain SGD step (no clipping, no momentum): the update is the learning rate times the gradient,
    so the weights after it show the gradient itself. 2 processes x 2 rows under ZeRO-3 must apply the
    gradient of 1 process x 4 rows: unpacked rows of unequal lengths, so a per-process mean of the loss,
    or a gradient scaled by the number of processes, shows."""
    from safetensors.torch import load_file

    common = {**SGD_STEP, "dataset_prepared_path": str(tmp_path / "prepared"), "base_model": str(_saved_base(tmp_path)),
              "train_from_scratch": False, "chunked_cross_entropy": True}  # fmt: skip
    one = write_config(tmp_path / "one.yml", tiny_config(tmp_path / "one", micro_batch_size=4, **common))
    _run([sys.executable, "-m", "dolphin_train", str(one)])
    zero3 = write_config(tmp_path / "z.yml", tiny_config(tmp_path / "z", micro_batch_size=2, deepspeed=ZERO3, **common))
    _torchrun(zero3)
    base = load_file(str(tmp_path / "base/model.safetensors"))
    single, sharded = (load_file(str(tmp_path / run / "out/model.safetensors")) for run in ("one", "z"))
    assert single.keys() == sharded.keys()
    for name, weight in single.items():
        reference = base.get(name)
        update = weight - reference if reference is not None and reference.shape == weight.shape else weight
        tolerance = 1e-4 * float(update.abs().max()) + 1e-7
        torch.testing.assert_close(sharded[name], weight, rtol=0, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_zero3_full_fine_tuning_matches_one_process_and_saves_consolidated(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    # Both runs start from the same saved weights (random initialisation under ZeRO-3 draws differently).
    common = {"max_steps": 3, "save_steps": 3, "sample_packing": True, "learning_rate": 1e-3,
              "dataset_prepared_path": str(tmp_path / "prepared"), "base_model": str(_saved_base(tmp_path)),
              "train_from_scratch": False}  # fmt: skip
    one = write_config(tmp_path / "one.yml", tiny_config(tmp_path / "one", micro_batch_size=4, **common))
    _run([sys.executable, "-m", "dolphin_train", str(one)])
    # ZeRO-3 runs the chunked loss, computed in the output head's forward where DeepSpeed gathers its weight.
    zero3 = write_config(tmp_path / "z.yml", tiny_config(tmp_path / "z", micro_batch_size=2, deepspeed=ZERO3,
                                                         chunked_cross_entropy=True, **common))  # fmt: skip
    result = _torchrun(zero3)
    assert "DeepSpeed" in result.stdout and "Chunked cross-entropy: the full logits" in result.stdout + result.stderr
    # Same global batches: the first loss is the same computation; later ones follow within 1e-3.
    assert _losses(tmp_path / "z/out") == pytest.approx(_losses(tmp_path / "one/out"), rel=1e-3)
    weights = load_file(str(tmp_path / "z/out/model.safetensors"))
    reference = load_file(str(tmp_path / "one/out/model.safetensors"))
    assert weights.keys() == reference.keys()  # consolidated: every tensor whole, with the values of one process
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_zero3_qlora_trains_and_saves_a_whole_adapter(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    keys = {"base_model": str(_saved_base(tmp_path)), "train_from_scratch": False, "max_steps": 2,
            "sample_packing": True, "micro_batch_size": 2, "deepspeed": ZERO3, "adapter": "qlora",
            "load_in_4bit": True, "lora_r": 4, "chunked_cross_entropy": True}  # fmt: skip
    cfg = tiny_config(tmp_path, **keys)
    _torchrun(write_config(tmp_path / "c.yml", cfg))
    adapter = load_file(str(tmp_path / "out/adapter_model.safetensors"))
    assert all(v.numel() > 0 for v in adapter.values())
    embeddings = [v for k, v in adapter.items() if "embed_tokens" in k]
    assert embeddings and embeddings[0].shape == (2050, 192)  # new tokens: embeddings trained in full


def test_the_dolphin_29_recipe_in_miniature_under_zero3(tmp_path: Path, llama3_dir: str) -> None:
    """configs/llama3-8b.yml as shipped (ZeRO-3 with bf16 `auto`, adamw_8bit, gradient checkpointing,
    packed rows, ChatML tokens, evaluation) with only the model, tokenizer, data and length made small:
    a 2-layer model with Llama-3's real vocabulary, so the chunked loss is on by default."""
    import yaml
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(shape).save_pretrained(tmp_path / "model")
    rows = (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:120]
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    cfg = yaml.safe_load((REPO / "configs/llama3-8b.yml").read_text())
    cfg.update(base_model=str(tmp_path / "model"), tokenizer_config=llama3_dir, sequence_len=1024, max_steps=3,
               datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "sharegpt", "conversation": "chatml"}],
               dataset_prepared_path=str(tmp_path / "prepared"), output_dir=str(tmp_path / "out"),
               wandb_project=None, val_set_size=0.1, micro_batch_size=2, gradient_accumulation_steps=1)  # fmt: skip
    result = _torchrun(write_config(tmp_path / "c.yml", cfg))
    assert "Chunked cross-entropy: the full logits are never materialised" in result.stdout + result.stderr
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert len(summary["eval_losses"]) >= 2 and 0 < summary["final_eval_loss"] < 20
    with safe_open(str(tmp_path / "out/model.safetensors"), "pt") as f:
        assert f.get_slice("lm_head.weight").get_shape()[1] == 64  # gathered whole from the ZeRO-3 shards
    tokenizer_config = json.loads((tmp_path / "out/tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
