"""ReLoRA: restarts keep the model's function, re-draw A and zero B, prune the LoRA optimizer states, follow
the jagged learning-rate schedule, and a run's checkpoints, resume and final model carry the merged base."""

from __future__ import annotations

import json
import math
import shutil
import signal
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
    lora_delta,
    lora_layers,
    merged_restarts,
    prune_moments,
    restart_seed,
    sums_of,
)
from dolphin_train.train.schedule import JaggedRestarts

RELORA = {"adapter": "lora", "relora": True, "jagged_restart_steps": 4, "lora_r": 4, "lora_alpha": 8}


def _lora_model(base_dir: Path, four_bit: bool = False, dtype: torch.dtype = torch.float32,
                targets: Any = "all-linear") -> Any:
    """The tiny base with a LoRA adapter after one cycle of training: B not zero, each layer's update about
    1% of its weight (the size a cycle at a real learning rate leaves, see `_set_update`). In training mode
    with no dropout (the same function as evaluation): in evaluation mode bitsandbytes repacks 4-bit weights
    for its CPU kernel on CPUs with AVX512-BF16, and the tests must not depend on the CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if four_bit else None  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=dtype)
    if four_bit:
        # As load_model does for a model that trains: without it, an eval pass repacks the 4-bit weights on an
        # AVX-512 BF16 CPU only (bfloat16 block scales), and a restart would merge different numbers there
        # than on an AVX2 CPU.
        keep_standard_layout(base)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    for layer in lora_layers(model).values():
        _set_update(layer, 0.01, seed=2)
    return model.train()


def _factors(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a LoRA layer, as peft stores them for linear layers and for embeddings."""
    if "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


@torch.no_grad()
def _set_update(layer: Any, size: float, seed: int) -> None:
    """Factors whose update has `size` x the root mean square of the layer's base weight: what one cycle of
    training leaves (0.1% to 3% of a weight, the issue measured; a learning rate of 2e-4 for 150 steps moves a
    rank-8 update of a 4096-wide layer by about 1%)."""
    from dolphin_train.model.quantised import dequantized

    generator = torch.Generator().manual_seed(seed)
    a, b = _factors(layer)
    a.copy_(torch.randn(a.shape, generator=generator) / a.shape[-1] ** 0.5)
    b.copy_(torch.randn(b.shape, generator=generator))
    update, weight = layer.get_delta_weight("default").float(), dequantized(layer.get_base_layer().weight).float()
    b.mul_(size * weight.pow(2).mean().sqrt() / update.pow(2).mean().sqrt())


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


def test_restart_of_a_4bit_base_keeps_the_full_precision_sum_and_quantises_a_copy(base_dir: Path) -> None:
    """The merged weight is kept in float32 (the dequantised base plus the update, exactly); the 4-bit weight
    the next cycle trains over is bitsandbytes' quantisation of it; the final model is the float32 sum."""
    import bitsandbytes.functional as bnbf

    from dolphin_train.model.quantised import dequantized
    from dolphin_train.train.relora import merged_model

    model = _lora_model(base_dir, four_bit=True)
    layers = lora_layers(model)
    expected = {}
    for name, layer in layers.items():
        assert type(layer.get_base_layer().weight).__name__ == "Params4bit"
        expected[name] = dequantized(layer.get_base_layer().weight).float() + layer.get_delta_weight("default")
    before = _logits(model)
    ReLoRA(4, 0.9, "magnitude", cpu_offload=True, seed=7).restart(model, None, step=4)
    for name, layer in layers.items():
        assert torch.equal(sums_of(model)[name], expected[name])
        packed, state = bnbf.quantize_4bit(expected[name], quant_type="nf4", compress_statistics=True)
        assert torch.equal(dequantized(layer.get_base_layer().weight), bnbf.dequantize_4bit(packed, state))
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    # the model the run ends with has the function LoRA had, to float32 rounding
    torch.testing.assert_close(_logits(merged_model(model)), before, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("four_bit", "dtype"), [(True, torch.float32), (True, torch.bfloat16),
                                                 (False, torch.bfloat16)], ids=["nf4", "nf4-bf16", "bf16"])  # fmt: skip
def test_ten_restarts_of_small_updates_keep_what_they_learned(base_dir: Path, four_bit: bool,
                                                              dtype: torch.dtype) -> None:  # fmt: skip
    """Each cycle adds 0.5% of a weight's size in one direction: the final model holds the sum of the ten
    updates (an NF4 step is about 10% of a weight, a bfloat16 step 0.4 to 0.8% of its value: merged into the
    4-bit or 16-bit weight itself, most of each update would round away)."""
    from dolphin_train.model.quantised import dequantized
    from dolphin_train.train.relora import merged_model

    model = _lora_model(base_dir, four_bit=four_bit, dtype=dtype, targets=["q_proj", "down_proj"])
    layers = lora_layers(model)
    start = {n: dequantized(layer.get_base_layer().weight).float().clone() for n, layer in layers.items()}
    total = {n: torch.zeros_like(w) for n, w in start.items()}
    relora = ReLoRA(4, 0.9, "magnitude", cpu_offload=False, seed=7)
    for restart in range(1, 11):
        for name, layer in layers.items():
            _set_update(layer, 0.005, seed=2)  # the same direction every cycle
            total[name] += layer.get_delta_weight("default").float()
        relora.restart(model, None, step=4 * restart)
    merged = dict(merged_model(model).named_modules())
    for name in layers:
        learned = merged[name.removeprefix("base_model.model.")].weight.float() - start[name]
        kept = float((learned * total[name]).sum() / total[name].pow(2).sum())
        assert kept > 0.99, (name, kept)
        if dtype == torch.float32:  # no rounding but float32's
            torch.testing.assert_close(learned, total[name], atol=1e-6, rtol=1e-4)


def test_the_checkpointed_sums_give_a_resumed_model_the_same_weights(base_dir: Path, tmp_path: Path) -> None:
    """The float32 sums are what a checkpoint holds: loaded into a fresh 4-bit model, they give the same sums
    and the same 4-bit weights as the run that saved them."""
    from dolphin_train.model.quantised import dequantized
    from dolphin_train.train.relora import load_base, save_base

    model = _lora_model(base_dir, four_bit=True, targets=["q_proj", "down_proj"])
    ReLoRA(4, 0.9, "magnitude", cpu_offload=True, seed=7).restart(model, None, step=4)
    save_base(model, tmp_path)
    fresh = _lora_model(base_dir, four_bit=True, targets=["q_proj", "down_proj"])
    load_base(fresh, tmp_path / BASE_FILE, cpu_offload=True)
    saved, loaded, sums = lora_layers(model), lora_layers(fresh), sums_of(fresh)
    assert sums.keys() == sums_of(model).keys() == saved.keys()
    for name, layer in saved.items():
        assert sums[name].dtype == torch.float32 and torch.equal(sums[name], sums_of(model)[name])
        assert torch.equal(dequantized(loaded[name].get_base_layer().weight),
                           dequantized(layer.get_base_layer().weight))  # fmt: skip
    # a file of the earlier format (the 4-bit codes themselves, which had lost most of each update): refused
    from safetensors.torch import save_file

    from dolphin_train.errors import DolphinError

    save_file({"x": torch.zeros(1)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(DolphinError, match="older format"):
        load_base(fresh, tmp_path / "old.safetensors")


def test_a_weight_repacked_for_bitsandbytes_cpu_kernel_is_requantised_with_its_own_settings(base_dir: Path) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes' evaluation forward repacks a 4-bit weight for its kernel (double
    quantisation undone, bfloat16 scales) and keeps the original settings aside: the restart quantises with those
    (built here with bitsandbytes' own repacking, whatever this CPU is)."""
    import bitsandbytes.functional as bnbf

    from dolphin_train.train.relora import set_base

    layer = next(iter(lora_layers(_lora_model(base_dir, four_bit=True, targets=["q_proj"])).values()))
    weight = layer.get_base_layer().weight
    full = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert weight.quant_state.packing_format_for_cpu and not weight.quant_state.nested
    set_base(layer, full)
    state = weight.quant_state
    assert state.nested and state.dtype == torch.float32 and not getattr(state, "packing_format_for_cpu", False)
    packed, expected = bnbf.quantize_4bit(full, quant_type="nf4", compress_statistics=True)
    assert torch.equal(weight.data, packed)
    assert torch.equal(bnbf.dequantize_4bit(weight.data, state), bnbf.dequantize_4bit(packed, expected))


# ---- embeddings and the layers ReLoRA cannot restart ---------------------------------------------------------


def test_lora_on_the_embedding_is_merged_and_restarted(base_dir: Path) -> None:
    """peft keeps an embedding's factors in `lora_embedding_A/B` (A zero and B normal at the start): merged
    like the others, and restarted as peft starts them."""
    from dolphin_train.train.relora import merged_model

    model = _lora_model(base_dir, targets=["q_proj", "embed_tokens"])
    layers = lora_layers(model)
    assert "default" in layers["base_model.model.model.embed_tokens"].lora_embedding_A
    before = _logits(model)
    ReLoRA(4, 0.9, "magnitude", cpu_offload=False, seed=7).restart(model, None, step=4)
    torch.testing.assert_close(_logits(model), before, atol=2e-5, rtol=1e-5)
    a, b = _factors(layers["base_model.model.model.embed_tokens"])
    assert torch.count_nonzero(a) == 0 and b.std() > 0.5  # peft's start: the update is zero again
    torch.testing.assert_close(_logits(merged_model(model)), before, atol=2e-5, rtol=1e-5)


def test_layers_relora_cannot_merge_are_refused_with_the_reason(base_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from dolphin_train.train.relora import refuse_unsupported_layers

    class WithConv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(8, 8, 3)

    conv = get_peft_model(WithConv(), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ConfigError, match="conv: a LoRA Conv1d layer"):
        refuse_unsupported_layers(conv)
    tied = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir, tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    with pytest.raises(ConfigError, match=r"lm_head shares its weight with model\.embed_tokens"):
        refuse_unsupported_layers(_lora_model(tmp_path / "tied", targets=["q_proj", "lm_head"]))
    dora = get_peft_model(WithLinear(), LoraConfig(r=2, target_modules=["linear"], use_dora=True))
    with pytest.raises(ConfigError, match="linear: a DoRA layer"):
        refuse_unsupported_layers(dora)
    refuse_unsupported_layers(_lora_model(base_dir, targets=["q_proj", "embed_tokens", "lm_head"]))  # all fine


class WithLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)


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


@pytest.mark.parametrize(
    ("keys", "axolotl"),
    [
        # axolotl's JaggedLRRestartScheduler: scale = floor + (1 - floor) x t, floor = cosine_min_lr_ratio or 0.001;
        # t = 1 before step `every - anneal`, then (step % every) / warmup inside a warmup, (every - step % every) /
        # anneal inside an anneal, else 1. Values worked out by hand from that rule:
        ({"jagged_restart_steps": 10, "jagged_restart_warmup_steps": 3, "jagged_restart_anneal_steps": 4,
          "lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1},
         {0: 1.0, 5: 1.0, 6: 1.0, 7: 0.775, 9: 0.325, 10: 0.1, 11: 0.4, 12: 0.7, 13: 1.0, 17: 0.775, 20: 0.1}),
        ({"jagged_restart_steps": 4, "lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.25},  # warmup 10, anneal 1
         {0: 1.0, 2: 1.0, 3: 0.475, 4: 0.25, 5: 0.325, 7: 0.475, 8: 0.25}),
        ({"jagged_restart_steps": 4},  # no cosine_min_lr_ratio: axolotl's 0.001
         {2: 1.0, 3: 0.3007, 4: 0.001, 5: 0.1009, 7: 0.3007}),
        ({"jagged_restart_steps": 5, "jagged_restart_warmup_steps": 2, "lr_scheduler": "cosine",
          "cosine_min_lr_ratio": 0.0},  # 0 is falsy: axolotl's `or` gives 0.001
         {5: 0.001, 6: 0.5005, 7: 1.0, 10: 0.001}),
    ],
    ids=["min ratio 0.1, warmup 3, anneal 4", "min ratio 0.25, defaults", "no min ratio", "min ratio 0"],
)  # fmt: skip
def test_the_restart_floor_follows_axolotls_rule(tmp_path: Path, keys: dict, axolotl: dict) -> None:
    from dolphin_train.train.schedule import jagged_restarts

    jagged = jagged_restarts(validate_mapping(tiny_config(tmp_path, **keys)))
    assert jagged is not None
    for step, factor in axolotl.items():
        assert jagged.multiplier(step) == pytest.approx(factor, abs=1e-12), step


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
    model = run.trainer.model
    layers, sums = lora_layers(model), sums_of(model)
    assert sums.keys() == (set(layers) if four_bit else set())  # a float32 base is its own sum
    # the final model: each adapted layer's float32 sum plus the last update (over a 4-bit base not the 4-bit
    # copy the last cycle trained over: that copy is the sum quantised)
    expected = {n.removeprefix("base_model.model.") + ".weight": sums[n] + lora_delta(layer, "cpu")
                for n, layer in layers.items() if four_bit}  # fmt: skip
    in_memory = None if four_bit else _logits(model.eval())
    run.trainer.model = merged_model(model)
    save_final_model(run.trainer, run.cfg.output_dir)
    out = Path(run.cfg.output_dir)
    assert not (out / "adapter_model.safetensors").exists()
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    if in_memory is not None:
        torch.testing.assert_close(_logits(saved), in_memory, atol=1e-4, rtol=1e-4)
    weights = dict(saved.named_parameters())
    for name, weight in expected.items():
        torch.testing.assert_close(weights[name], weight, atol=1e-6, rtol=1e-5)


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


def test_a_checkpoint_without_the_merged_weights_is_not_one_to_resume_from(tmp_path: Path) -> None:
    """A checkpoint after a restart that lacks relora_base.safetensors (written by an earlier version, or by a run
    without relora): `auto` skips it for an earlier one, a named one is refused saying what it lacks."""
    from dolphin_train.errors import DolphinError
    from dolphin_train.train.control import latest_complete_checkpoint, resolve_resume

    out = tmp_path / "out"
    for step in (3, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (out / f"checkpoint-{step}" / "rng_state.pth").write_bytes(b"")
    cfg = validate_mapping(tiny_config(tmp_path, **RELORA, resume_from_checkpoint="auto"))
    assert latest_complete_checkpoint(out) == out / "checkpoint-6"  # complete as the Trainer sees it
    assert resolve_resume(cfg) == str(out / "checkpoint-3")  # before the first restart: nothing else needed
    (out / "checkpoint-6" / BASE_FILE).write_bytes(b"")
    assert resolve_resume(cfg) == str(out / "checkpoint-6")
    (out / "checkpoint-6" / BASE_FILE).unlink()
    with pytest.raises(DolphinError, match=f"checkpoint-6 lacks {BASE_FILE}, which this run needs"):
        resolve_resume(cfg.model_copy(update={"resume_from_checkpoint": str(out / "checkpoint-6")}))


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing in the Trainer catches it)."""


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_from_a_complete_checkpoint(
    tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while the ReLoRA weights of checkpoint-9 are written, with save_total_limit: 1: checkpoint-9
    does not count as complete and checkpoint-6 is still there (nothing was rotated away), so the run resumes
    from checkpoint-6 and finishes."""
    from dolphin_train.recipe import run_training
    from dolphin_train.train import relora
    from dolphin_train.train.control import latest_complete_checkpoint

    write = relora.save_base

    def killed_in_checkpoint_9(model: Any, *args: Any) -> Path:
        directory = Path(args[-1])
        if directory.name != "checkpoint-9":
            return write(model, *args)
        (directory / BASE_FILE).with_suffix(".partial").write_bytes(b"cut off")
        raise Killed

    keys = {"save_steps": 3, "save_total_limit": 1}
    monkeypatch.setattr(relora, "save_base", killed_in_checkpoint_9)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Killed):
        run_training(validate_mapping(_relora_config(tmp_path, base_dir, **keys)))
    for sig, handler in handlers.items():  # the killed run never got to put back its signal handlers
        signal.signal(sig, handler)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "checkpoint-6" / BASE_FILE).exists()
    assert latest_complete_checkpoint(out) == out / "checkpoint-6"
    summary = run_training(validate_mapping(_relora_config(tmp_path, base_dir, resume_from_checkpoint="auto",
                                                           **keys)))  # fmt: skip
    assert summary["resumed_from"].endswith("checkpoint-6") and summary["steps"] == 10
    assert (out / "model.safetensors").exists() and not (out / "checkpoint-9").exists()
