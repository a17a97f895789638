"""Sparse fine-tuning (`llmcompressor:` with a ConstantPruningModifier): a 2:4-sparse model's zeros stay zero
through training, with AdamW and with an 8-bit optimizer, while everything else trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError

TARGETS = ["re:.*q_proj.weight", "re:.*o_proj.weight", "re:.*gate_proj.weight", "re:.*down_proj.weight"]
RECIPE = {"finetuning_stage": {"finetuning_modifiers": {"ConstantPruningModifier": {"targets": TARGETS, "start": 0}}}}
PRUNED = ("q_proj.weight", "o_proj.weight", "gate_proj.weight", "down_proj.weight")


def two_of_four_sparse_model(directory: Path) -> Path:
    """The tiny model with every targeted weight 2:4 sparse (the two smallest of each four set to zero)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(PRUNED):
                groups = p.view(-1, 4)
                smallest = groups.abs().argsort(dim=1)[:, :2]
                groups.scatter_(1, smallest, 0.0)
    model.save_pretrained(directory)
    return directory


def train(tmp_path: Path, sparse: bool, optimizer: str = "adamw_torch") -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from dolphin_train.recipe import run_training

    base = two_of_four_sparse_model(tmp_path / "base")
    raw = tiny_config(tmp_path, base_model=str(base), train_from_scratch=False, max_steps=4, learning_rate=1e-2,
                      optimizer=optimizer, max_grad_norm=1.0)  # fmt: skip
    if sparse:
        raw["llmcompressor"] = {"recipe": RECIPE, "save_compressed": True}
        raw["plugins"] = ["axolotl.integrations.llm_compressor.LLMCompressorPlugin"]
    run_training(validate_mapping(raw))
    return load_file(base / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_bnb_8bit"])
def test_the_zeros_stay_zero_and_the_rest_trains(tmp_path: Path, optimizer: str) -> None:
    before, after = train(tmp_path, sparse=True, optimizer=optimizer)
    pruned = [n for n in before if n.endswith(PRUNED)]
    assert pruned
    for name in pruned:
        zeros = before[name] == 0
        assert zeros.float().mean() == pytest.approx(0.5)
        assert (after[name][zeros] == 0).all(), name
        assert (after[name][~zeros] != before[name][~zeros]).float().mean() > 0.9, name  # the rest trained
    untargeted = next(n for n in before if n.endswith("up_proj.weight"))
    assert not torch.equal(after[untargeted], before[untargeted])
    assert "ConstantPruningModifier" in (tmp_path / "out/recipe.yaml").read_text()


def test_without_the_recipe_the_zeros_fill_in(tmp_path: Path) -> None:
    before, after = train(tmp_path, sparse=False)
    name = next(n for n in before if n.endswith("q_proj.weight"))
    zeros = before[name] == 0
    assert (after[name][zeros] != 0).float().mean() > 0.9


def test_weights_at_llm_compressors_threshold_count_as_zeros(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from dolphin_train.train.sparsity import KeepZeros

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model"))
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q[0, :3] = torch.tensor([5e-9, -1e-8, 2e-8])
    KeepZeros(model, ("model.layers.0.self_attn.q_proj.weight",))
    assert q[0, :3].tolist() == [0.0, 0.0, pytest.approx(2e-8)]


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ({"recipe": {"s": {"pruning_modifiers": {"SparseGPTModifier": {"sparsity": 0.5}}}}}, "SparseGPTModifier: not "
                                                                                              "supported"),
        ({"recipe": {"s": {"m": {"ConstantPruningModifier": {"targets": ["x"], "end": 2}}}}}, "expected `<name>_mod"),
        ({"recipe": {"s": {"f_modifiers": {"ConstantPruningModifier": {"targets": ["x"], "end": 2}}}}}, "start or end"),
        ({"recipe": {"s": {"f_modifiers": {"ConstantPruningModifier": {"targets": ["re:("]}}}}}, "not a regular exp"),
        ({"recipe": "recipe.yaml"}, "give the recipe inline"),
        ({"recipe": RECIPE, "save_compresed": True}, "save_compresed"),
    ],
)
def test_recipes_it_cannot_run_are_refused(tmp_path: Path, block: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        validate_mapping(tiny_config(tmp_path, llmcompressor=block))


def test_sparse_fine_tuning_is_full_fine_tuning(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not with adapter"):
        validate_mapping(tiny_config(tmp_path, llmcompressor={"recipe": RECIPE}, adapter="lora"))
    with pytest.raises(ConfigError, match="LLMCompressorPlugin: set llmcompressor"):
        validate_mapping(tiny_config(tmp_path, plugins=["axolotl.integrations.llm_compressor.LLMCompressorPlugin"]))


def test_targets_that_match_nothing_are_named() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from dolphin_train.errors import DolphinError
    from dolphin_train.train.sparsity import KeepZeros

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model"))
    with pytest.raises(DolphinError, match=r"re:.*qkv.weight\); names look like 'model.embed_tokens.weight'"):
        KeepZeros(model, ("re:.*qkv.weight",))
