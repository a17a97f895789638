"""ReLoRA: restarts keep the model's function, re-draw A and zero B, prune the LoRA optimizer states, follow
the jagged learning-rate schedule, and a run's checkpoints, resume and final model carry the merged base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, tiny_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError
from dolphin_train.model.quantised import keep_standard_layout
from dolphin_train.train.relora import (
    BASE_FILE,
    ReLoRA,
    lora_layers,
    merged_restarts,
    prune_moments,
    restart_seed,
)
from dolphin_train.train.schedule import JaggedRestarts

RELORA = {"adapter": "lora", "relora": True, "jagged_restart_steps": 4, "lora_r": 4, "lora_alpha": 8}


def _lora_model(base_dir: Path, four_bit: bool = False) -> Any:
    """The tiny base with a LoRA adapter whose B is not zero (as after some training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if four_bit else None  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    if four_bit:
        # As load_model does for a model that trains: without it, the eval pass below repacks the 4-bit weights
        # on an AVX-512 BF16 CPU only (bfloat16 block scales), and the restart would merge different numbers
        # there than on an AVX2 CPU.
        keep_standard_layout(base)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def _logits(model: Any) -> torch.Tensor:
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- config -------------------------------------------------------------------------------------------------


def test_axolotl_relora_keys_validate(tmp_path: Path) -> None:
    cfg = validate_mapping(tiny_config(tmp_path, **RELORA, relora_prune_ratio=0.9, relora_cpu_offload=False,
                                       jagged_restart_warmup_steps=10, jagged_restart_anneal_steps=False))  # fmt: skip
    assert cfg.relora and cfg.jagged_restart_steps == 4


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"adapter": None}, "relora: true merges and restarts a LoRA adapter: set adapter: lora or qlora"),
        ({"jagged_restart_steps": None}, "set jagged_restart_steps"),
        ({"fsdp": ["full_shard"], "fsdp_config": {"fsdp_version": 2}}, "it cannot be combined with fsdp"),
        ({"optimizer": "sgd"}, "prunes Adam's moments at each restart; optimizer: sgd"),
        ({"peft_use_dora": True}, "it cannot be combined with peft_use_dora"),
        ({"relora": False}, "relora_prune_ratio: no effect without relora: true"),
        ({"jagged_restart_anneal_steps": True}, "not true"),
        ({"relora_prune_ratio": 1.5}, "relora_prune_ratio"),
        ({"jagged_restart_steps": None, "relora_steps": 150}, "relora_steps: unknown key (axolotl renamed it "
                                                              "`jagged_restart_steps`)"),
    ],
)  # fmt: skip
def test_combinations_that_cannot_work_are_refused(tmp_path: Path, keys: dict, says: str) -> None:
    raw = {**tiny_config(tmp_path, **RELORA), "relora_prune_ratio": 0.5, **keys}
    with pytest.raises(ConfigError) as info:
        validate_mapping({k: v for k, v in raw.items() if v is not None})
    assert says in str(info.value)


# ---- the restart --------------------------------------------------------------------------------------------


def test_restart_keeps_the_function_zeroes_b_and_redraws_a(base_dir: Path) -> None:
    model = _lora_model(base_dir)
    before, a_before = _logits(model), {n: p.clone() for n, p in model.named_parameters() if "lora_A" in n}
    ReLoRA(4, 0.9, "magnitude", cpu_offload=False, seed=7).restart(model, None, step=4)
    torch.testing.assert_close(_logits(model), before, atol=2e-5, rtol=1e-5)
    # A is drawn as peft draws it (Kaiming-uniform, a = sqrt(5)) from a generator of the seed and restart
    reference = torch.Generator().manual_seed(restart_seed(7, 1, 0))
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(b) == 0
        drawn = torch.empty_like(a)
        torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=reference)
        assert torch.equal(a, drawn) and not torch.equal(a, a_before[f"{name}.lora_A.default.weight"])
        assert a.abs().max() <= 1 / math.sqrt(a.shape[1])  # peft's bound for the fan-in


def test_restart_of_a_4bit_base_keeps_the_function_within_quantisation_error(base_dir: Path) -> None:
    import bitsandbytes.functional as bnbf

    model = _lora_model(base_dir, four_bit=True)
    layers = lora_layers(model)
    expected = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        assert type(weight).__name__ == "Params4bit"
        expected[name] = bnbf.dequantize_4bit(weight.data, weight.quant_state) + layer.get_delta_weight("default")
    before = _logits(model)
    ReLoRA(4, 0.9, "magnitude", cpu_offload=True, seed=7).restart(model, None, step=4)
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        # exactly bitsandbytes' own quantisation of base + update: the only error is the quantisation's
        packed, state = bnbf.quantize_4bit(expected[name], quant_type="nf4", compress_statistics=True)
        assert torch.equal(bnbf.dequantize_4bit(weight.data, weight.quant_state), bnbf.dequantize_4bit(packed, state))
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    after = _logits(model)
    # the restart moves the logits less than quantising the base to 4 bits at all does
    quantisation = (_logits(_lora_model(base_dir)) - before).abs().mean()
    assert 0 < (after - before).abs().mean() < quantisation
    assert not torch.equal(after, before)  # the base really was re-quantised


# ---- the optimizer states -----------------------------------------------------------------------------------


def test_magnitude_pruning_zeroes_the_smallest_adam_moments_at_the_ratio() -> None:
    param = torch.nn.Parameter(torch.randn(64, 32))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.randn_like(param)
    optimizer.step()
    state = optimizer.state[param]
    original = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    prune_moments(state, 0.75, "magnitude", torch.Generator())
    for key, was in original.items():
        now = state[key]
        assert int((now == 0).sum()) == int(0.75 * now.numel())
        kept = now != 0
        assert torch.equal(now[kept], was[kept])
        assert was[kept].abs().min() >= was[~kept].abs().max()  # the largest ones are kept


def test_random_pruning_follows_the_ratio_and_the_generator() -> None:
    values = torch.randn(200, 100)
    pruned = prune_moments_on(values.clone(), 0.999, "reset", seed=5)
    assert abs(float((pruned == 0).float().mean()) - 0.999) < 0.001
    assert torch.equal(pruned, prune_moments_on(values.clone(), 0.999, "reset", seed=5))


def prune_moments_on(values: torch.Tensor, ratio: float, method: str, seed: int) -> torch.Tensor:
    state = {"exp_avg": values}
    prune_moments(state, ratio, method, torch.Generator().manual_seed(seed))
    return state["exp_avg"]


def test_bitsandbytes_8bit_moments_are_pruned_by_their_values() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    # transformers registers 32-bit overrides for embedding weights by id(): forget those of earlier tests,
    # or this parameter may reuse such an id and get 32-bit states
    bnb.optim.GlobalOptimManager.get_instance().initialize()
    param = torch.nn.Parameter(torch.randn(64, 128))  # over bitsandbytes' 4096 values: 8-bit states
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    optimizer.step()
    state = optimizer.state[param]
    assert state["state1"].dtype == torch.uint8

    def values(codes: str, absmax: str, qmap: str) -> torch.Tensor:
        return bnbf.dequantize_blockwise(state[codes], absmax=state[absmax], code=state[qmap], blocksize=256)

    before = [values("state1", "absmax1", "qmap1"), values("state2", "absmax2", "qmap2")]
    prune_moments(state, 0.6, "magnitude", torch.Generator())
    after = [values("state1", "absmax1", "qmap1"), values("state2", "absmax2", "qmap2")]
    for was, now in zip(before, after, strict=True):
        zeroed = float((now == 0).float().mean())
        # exact zeros, at the ratio (ties among the dequantised values may add a few)
        assert int(0.6 * now.numel()) / now.numel() <= zeroed < 0.65, zeroed
        kept = now != 0
        torch.testing.assert_close(now[kept], was[kept], atol=0.0, rtol=0.02)


# ---- the jagged schedule ------------------------------------------------------------------------------------


def test_jagged_multiplier_matches_a_hand_computation() -> None:
    jagged = JaggedRestarts(every=10, warmup=3, anneal=4)
    low = 0.001
    hand = {0: 1.0, 5: 1.0, 6: 1.0, 7: low + (1 - low) * 3 / 4, 9: low + (1 - low) * 1 / 4, 10: low,
            11: low + (1 - low) / 3, 12: low + (1 - low) * 2 / 3, 13: 1.0, 16: 1.0, 17: low + (1 - low) * 3 / 4,
            20: low}  # fmt: skip
    for step, factor in hand.items():
        assert jagged.multiplier(step) == pytest.approx(factor), step
    assert merged_restarts(4, 4) == 0 and merged_restarts(5, 4) == 1 and merged_restarts(9, 4) == 2


# ---- a run ----------------------------------------------------------------------------------------------------


def _data(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:32]]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def _relora_config(tmp_path: Path, base_dir: Path, **overrides: Any) -> dict[str, Any]:
    keys = {"base_model": str(base_dir), "train_from_scratch": False, "max_steps": 10, "sequence_len": 256,
            "sample_packing": True, "micro_batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant",
            "jagged_restart_warmup_steps": 2, **RELORA, **overrides}  # fmt: skip
    return tiny_config(tmp_path, _data(tmp_path), **keys)


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_a_run_with_restarts_trains_and_saves_the_merged_model(tmp_path: Path, base_dir: Path, four_bit: bool) -> None:
    from transformers import AutoModelForCausalLM

    from dolphin_train.recipe import set_up_run
    from dolphin_train.train.outputs import save_final_model
    from dolphin_train.train.relora import merged_model

    # 4-bit with the paper's near-full reset of the moments (magnitude pruning keeps the largest first and
    # second moments apart, and a kept first moment over a zeroed second one takes an outsized step)
    quantised = {"adapter": "qlora", "load_in_4bit": True, "optimizer": "paged_adamw_8bit",
                 "relora_prune_method": "reset", "relora_prune_ratio": None} if four_bit else {}  # fmt: skip
    raw = {k: v for k, v in _relora_config(tmp_path, base_dir, **quantised).items() if v is not None}
    run = set_up_run(validate_mapping(raw))
    run.trainer.train()
    history = run.trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses  # batches differ: the last three, averaged
    # the learning rate: constant x the jagged factor (restarts at steps 4 and 8, warmup 2)
    rates = [e["learning_rate"] for e in history if "learning_rate" in e]
    jagged = JaggedRestarts(every=4, warmup=2)
    assert rates == pytest.approx([1e-2 * jagged.multiplier(s) for s in range(10)])
    assert rates[4] == pytest.approx(1e-5)
    model = run.trainer.model.eval()
    in_memory = _logits(model)
    run.trainer.model = merged_model(model)
    save_final_model(run.trainer, run.cfg.output_dir)
    out = Path(run.cfg.output_dir)
    assert not (out / "adapter_model.safetensors").exists()
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(saved), in_memory, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resume_between_restarts_continues_exactly(tmp_path: Path, base_dir: Path) -> None:
    """Checkpoint at step 6 (after the restart at 4), resumed: the restart at 8 and the end match the
    uninterrupted run's."""
    from safetensors.torch import load_file

    from dolphin_train.errors import DolphinError
    from dolphin_train.recipe import run_training

    whole = tmp_path / "whole"
    run_training(validate_mapping(_relora_config(whole, base_dir, save_steps=6)))
    checkpoint = whole / "out" / "checkpoint-6"
    assert (checkpoint / BASE_FILE).exists() and (checkpoint / "adapter_model.safetensors").exists()
    assert not (whole / "out" / "checkpoint-4").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "out" / "checkpoint-6")
    summary = run_training(validate_mapping(_relora_config(resumed, base_dir, save_steps=6,
                                                           resume_from_checkpoint="auto")))  # fmt: skip
    assert summary["resumed_from"].endswith("checkpoint-6")
    first = load_file(str(whole / "out" / "model.safetensors"))
    second = load_file(str(resumed / "out" / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-6, rtol=1e-5)
    # without the merged base the checkpoint does not describe the model: refused, not resumed wrongly
    (resumed / "out" / "checkpoint-6" / BASE_FILE).unlink()
    shutil.rmtree(resumed / "out" / "checkpoint-10", ignore_errors=True)
    with pytest.raises(DolphinError, match=f"lacks {BASE_FILE}"):
        run_training(validate_mapping(_relora_config(resumed, base_dir, save_steps=6,
                                                     resume_from_checkpoint=str(resumed / "out" / "checkpoint-6"))))
