"""Long contexts: RoPE keys (`rope_scaling`, `rope_theta`) and the positions check, a million-token row
prepared, packed and collated, the dense-mask refusal, and the plan's longest context."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config, write_jsonl
from dolphin_train.config.load import load_config, validate_mapping
from dolphin_train.errors import ConfigError
from dolphin_train.plan.memory import GiB
from dolphin_train.plan.report import parse_memory

TINY_MODEL = str(REPO / "configs/tiny/model")  # max_position_embeddings 2048, rope_theta 10000


# ---- RoPE keys and the positions check --------------------------------------------------------------------


def test_rope_scaling_must_reach_sequence_len(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, sequence_len=8192)
    with pytest.raises(ConfigError, match=r"embeddings \(2048.*rope_scaling: \{rope_type: yarn, factor: 4"):
        validate_mapping(raw)
    validate_mapping({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match=r"past what rope_scaling reaches: factor 2\.0 x 2048 positions"):
        validate_mapping({**raw, "rope_scaling": {"type": "linear", "factor": 2.0}})
    validate_mapping({**raw, "rope_theta": 500000.0})  # a raised base frequency is the config's choice


@pytest.mark.parametrize(("keys", "said"), [
    ({"rope_scaling": {"rope_type": "stretchy", "factor": 2.0}}, "rope_type 'stretchy' is not one of"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a factor of 1 or more"),
    ({"rope_theta": 1e6, "model_config": {"rope_theta": 2e6}}, "both set RoPE: set it in one place"),
])  # fmt: skip
def test_rope_keys_are_checked(tmp_path: Path, keys: dict, said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        validate_mapping(tiny_config(tmp_path, **keys))


def test_rope_keys_reach_the_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from dolphin_train.model.load import load_model_config

    cfg = validate_mapping(tiny_config(tmp_path, sequence_len=4096, rope_theta=40000.0,
                                       rope_scaling={"type": "linear", "factor": 2.0}))  # fmt: skip
    config = load_model_config(cfg)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 40000.0}
    rotary = AutoModelForCausalLM.from_config(config).model.rotary_emb
    dim = config.head_dim
    expected = 1.0 / (40000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)) / 2.0
    torch.testing.assert_close(rotary.inv_freq, expected)
    # rope_theta alone keeps the model's (default) RoPE type
    only_theta = load_model_config(validate_mapping(tiny_config(tmp_path, rope_theta=20000.0)))
    assert only_theta.rope_parameters == {"rope_type": "default", "rope_theta": 20000.0}


# ---- a million-token row ------------------------------------------------------------------------------------

MILLION = 2**20


def test_a_million_token_row_is_prepared_packed_and_collated(tmp_path: Path) -> None:
    """Eight long conversations (~120k tokens each) into one packed row of 2^20 tokens: preparation, packing
    and the collator are linear in the tokens (a quadratic step would not finish)."""
    from dolphin_train.data.encode import IGNORE_INDEX
    from dolphin_train.data.packing import build_training_rows
    from dolphin_train.data.prepare import prepare_data
    from dolphin_train.model.tokenizer import load_tokenizer
    from dolphin_train.train.collator import ChatCollator

    words = " ".join(f"w{i % 97} x{i % 89}" for i in range(12_000))
    rows = [{"conversations": [{"from": "human", "value": f"{n}: {words}"}, {"from": "gpt", "value": words}]}
            for n in range(8)]  # fmt: skip
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "long.jsonl", rows), sequence_len=MILLION, sample_packing=True,
                      pad_to_sequence_len=True, rope_scaling={"rope_type": "yarn", "factor": 512.0})  # fmt: skip
    cfg = validate_mapping(raw)
    tok = load_tokenizer(cfg)
    prepared = prepare_data(cfg, tok.tokenizer)
    lengths = list(prepared.train["length"])
    assert len(lengths) == 8 and min(lengths) > 100_000 and sum(lengths) <= MILLION
    training = build_training_rows(cfg, prepared)
    assert len(training.train) == 1  # all eight in one row
    batch = ChatCollator(pad_token_id=tok.tokenizer.pad_token_id, pad_to=MILLION)([training.train[0]])
    assert batch["input_ids"].shape == (1, MILLION)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[:8] == [0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()]  # each conversation from position 0
    assert len(starts) == 9  # and the padding after them
    trained = batch["labels"][0] != IGNORE_INDEX
    assert 0 < int(trained.sum()) < sum(lengths) and not trained[sum(lengths):].any()


def test_dense_attention_masks_are_refused_at_a_million_tokens(tmp_path: Path) -> None:
    from dolphin_train.config.machine import Machine
    from dolphin_train.config.resolve import check_dense_mask, resolve_runtime
    from dolphin_train.errors import EnvironmentProblem
    from dolphin_train.recipe import set_up_run

    cfg = validate_mapping(tiny_config(tmp_path, sequence_len=MILLION,
                                       rope_scaling={"rope_type": "yarn", "factor": 512.0}))  # fmt: skip
    with pytest.raises(EnvironmentProblem, match="dense 1048576 x 1048576 mask per row"):
        set_up_run(cfg)  # before any data or model is loaded
    flash = cfg.model_copy(update={"flash_attention": True})
    check_dense_mask(flash, resolve_runtime(flash, Machine.planned("cuda", 1, 80 * 10**9)).attn_implementation)


# ---- the plan: tiled MLP counted, and the longest context ------------------------------------------------------

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B"  # shapes from the plan's table of known architectures
QLORA = {"adapter": "qlora", "load_in_4bit": True, "lora_r": 16, "optimizer": "adamw_8bit"}
AUTO = {"micro_batch_size": "auto", "gradient_checkpointing": "auto", "activation_offloading": "auto",
        "tiled_mlp": "auto"}  # fmt: skip


def _config_8b(tmp_path: Path, llama3_dir: str, **keys):
    settings = {"sequence_len": 4096, "micro_batch_size": 1, **keys}
    raw = tiny_config(tmp_path, base_model=LLAMA3_8B, tokenizer_config=llama3_dir, train_from_scratch=False,
                      sample_packing=True, pad_to_sequence_len=True, flash_attention=True, bf16="auto",
                      **settings)  # fmt: skip
    raw["special_tokens"] = {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(tmp_path / "c.yml", raw))


def test_the_plan_counts_the_tiled_mlp(tmp_path: Path, llama3_dir: str) -> None:
    from dolphin_train.plan.report import make_plan

    keys = {**QLORA, "gradient_checkpointing": "offload", "sequence_len": 131072}
    plain = make_plan(_config_8b(tmp_path / "plain", llama3_dir, **keys), 1, parse_memory("80GB"))
    tiled = make_plan(_config_8b(tmp_path / "tiled", llama3_dir, tiled_mlp=True, **keys), 1, parse_memory("80GB"))
    # the recomputed layer's MLP intermediates (14,336 values per token, several tensors) are gone
    assert plain.memory.total - tiled.memory.total > 131072 * 14336 * 2 * 3
    assert tiled.memory.total < 40 * GiB


def test_8b_qlora_at_4096_tokens_fits_8_gb_with_auto_settings(tmp_path: Path, llama3_dir: str) -> None:
    from dolphin_train.plan.report import make_plan

    plan = make_plan(_config_8b(tmp_path, llama3_dir, **QLORA, **AUTO), 1, parse_memory("8GB"))
    assert plan.fits, plan.auto
    assert plan.cfg.tiled_mlp is True and plan.cfg.offloads_activations


@pytest.mark.slow
def test_longest_context_of_8b_qlora_on_80_gb(tmp_path: Path, llama3_dir: str) -> None:
    from dolphin_train.plan.context import STEP, longest_context

    cfg = _config_8b(tmp_path, llama3_dir, **QLORA, **AUTO)
    found = longest_context(cfg, 1, parse_memory("80GB"))
    assert found.longest is not None and found.longest.sequence_len >= 400_000  # the target (unsloth: 342,733)
    assert found.first_too_long == found.longest.sequence_len + STEP
    assert found.longest.estimate.total <= parse_memory("80GB") and found.longest.cfg.tiled_mlp is True


def test_8b_full_fine_tuning_on_8_gpus_fits_4m_tokens_per_sequence(tmp_path: Path, llama3_dir: str) -> None:
    """The issue's multi-GPU target (ALST: 3.7M on 8 H100s): full fine-tuning under ZeRO-3 with context
    parallelism over the 8 GPUs, the tiled MLP over ZeRO-3's sharded weights, offloaded checkpoints, Liger's
    kernels (`plan --liger`) and one 4M-token row per step. Without the tiled MLP it does not fit."""
    from dolphin_train.plan.report import make_plan

    keys = {"deepspeed": str(REPO / "deepspeed_configs/zero3.json"), "optimizer": "adamw_8bit",
            "context_parallel_size": 8, "sequence_len": 4_000_000, "gradient_accumulation_steps": 1, **AUTO,
            "micro_batch_size": 1}  # fmt: skip
    cfg = _config_8b(tmp_path, llama3_dir, **keys)
    plan = make_plan(cfg, 8, parse_memory("80GB"), liger=True)
    assert plan.fits and plan.cfg.tiled_mlp is True and plan.cfg.offloads_activations, plan.auto
    untiled = make_plan(cfg.model_copy(update={"tiled_mlp": False}), 8, parse_memory("80GB"), liger=True)
    assert not untiled.fits


def test_longest_context_grows_with_memory_and_tiling(tmp_path: Path, llama3_dir: str,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from dolphin_train.cli import main
    from dolphin_train.plan.context import longest_context

    keys = {**QLORA, "gradient_checkpointing": "offload", "sequence_len": 32768}
    lengths = {}
    cases = (("24GB", "24GB", {}), ("48GB", "48GB", {}), ("48GB tiled", "48GB", {"tiled_mlp": True}))
    for name, memory, extra in cases:
        found = longest_context(_config_8b(tmp_path / name, llama3_dir, **keys, **extra), 1, parse_memory(memory))
        assert found.longest is not None and found.first_too_long == found.longest.sequence_len + 1024
        lengths[name] = found.longest.sequence_len
    assert lengths["24GB"] < lengths["48GB"] < lengths["48GB tiled"]
    path = str(tmp_path / "48GB tiled" / "c.yml")
    assert main(["plan", path, "--gpu-memory", "48GB", "--max-context"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"Longest sequence_len that fits 1 x 48 GB GPU: {lengths['48GB tiled']:,} tokens" in out



def test_context_parallelism_divides_a_rows_tokens_per_device() -> None:
    """Each process of a context-parallel group holds a contiguous 1/N of a row (the old key name too)."""
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.plan.memory import tokens_per_device

    base = {"base_model": "unused", "datasets": [{"path": "unused.jsonl"}], "sequence_len": 4_000_001}
    assert tokens_per_device(validate_mapping({**base, "context_parallel_size": 8})) == 500_001
    assert tokens_per_device(validate_mapping({**base, "sequence_parallel_degree": 4})) == 1_000_001
    assert tokens_per_device(validate_mapping({**base, "sequence_len": 4096})) == 4096
