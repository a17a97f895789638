"""Gemma 4, as axolotl's examples train it (gemma4/31b-qlora.yaml, gemma4-unified/12b-text-lora.yaml): a tiny
Gemma 4 built here trains through the normal recipe, and each key those examples need does what it says:
`gemma4_hybrid_attn_impl`, `liger_rms_norm_gated`, `bnb_config_kwargs` (the chat templates are pinned against
axolotl's own rows in test_templates.py)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, tiny_config, write_config
from dolphin_train.cli import main
from dolphin_train.config.load import load_config, validate_mapping
from dolphin_train.config.machine import Machine
from dolphin_train.config.resolve import HYBRID, RuntimeSettings, resolve_attention
from dolphin_train.errors import ConfigError, DolphinError

EXAMPLES = REPO / "tests/fixtures/axolotl_examples"  # their settings, typed out (README.md there)
# The examples' LoRA targets: the text decoder's projections of a multimodal checkpoint.
EXAMPLE_TARGETS = (
    r"model.language_model.layers.[\d]+.(_checkpoint_wrapped_module.)?(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"
)
CPU = Machine(device="cpu", bf16=False, tf32=False, varlen_attention=False, flash_attn=False, liger=False)
CUDA_FLASH = Machine(device="cuda", bf16=True, tf32=True, varlen_attention=True, flash_attn=True, liger=False)
CUDA_NO_FLASH = Machine(device="cuda", bf16=True, tf32=True, varlen_attention=True, flash_attn=False, liger=False)


def tiny_text_config(**overrides: Any) -> Any:
    """Gemma 4's text decoder in miniature: a sliding-window layer (head_dim 16, window 4) and a global one
    (head_dim 32, as the real global layers are twice as wide)."""
    from transformers import Gemma4TextConfig

    values = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                  max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    return Gemma4TextConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def gemma4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multimodal Gemma 4 checkpoint (text tower only, as the examples train it), saved."""
    from transformers import AutoModelForCausalLM, Gemma4Config

    path = tmp_path_factory.mktemp("gemma4")
    torch.manual_seed(0)
    config = Gemma4Config(text_config=tiny_text_config().to_dict())
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _example_run(tmp_path: Path, base: Path, **overrides: Any) -> dict[str, Any]:
    """The 31B QLoRA example's settings over the tiny model, tokenizer and data."""
    return {**_example_settings(tmp_path, base), **overrides}


def _example_settings(tmp_path: Path, base: Path) -> dict[str, Any]:
    return tiny_config(tmp_path, base_model=str(base), train_from_scratch=False, special_tokens={}, tokens=[],
                       chat_template="gemma4", eot_tokens=["<turn|>"], adapter="qlora", load_in_4bit=True,
                       lora_r=4, lora_alpha=8, lora_target_modules=EXAMPLE_TARGETS,
                       bnb_config_kwargs={"bnb_4bit_use_double_quant": True}, gemma4_hybrid_attn_impl=True,
                       plugins=["axolotl.integrations.liger.LigerPlugin"], liger_rms_norm=True,
                       liger_rms_norm_gated=True, sample_packing=True, sequence_len=256, micro_batch_size=2,
                       max_steps=2)  # fmt: skip


# ---- the model and the recipe ----------------------------------------------------------------------------


def test_the_examples_load(tmp_path: Path) -> None:
    qlora = load_config(EXAMPLES / "gemma4-31b-qlora.yaml", {"tf32": "auto"})
    assert qlora.template_name == "gemma4" and qlora.gemma4_hybrid_attn_impl and qlora.liger_rms_norm_gated
    assert qlora.bnb_config_kwargs == {"bnb_4bit_use_double_quant": True}
    assert load_config(EXAMPLES / "gemma4-unified-12b-text-lora.yaml", {"tf32": "auto"}).template_name == (
        "gemma4_unified"
    )


def test_qlora_trains_tiny_gemma4_with_the_examples_settings(tmp_path: Path, gemma4_dir: Path) -> None:
    """The example's regex adapts the text decoder's seven projections in every layer; training runs."""
    from safetensors import safe_open

    path = write_config(tmp_path / "c.yml", _example_run(tmp_path, gemma4_dir))
    assert main([str(path)]) == 0
    with safe_open(str(tmp_path / "out/adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    adapted = {k.split(".lora_")[0] for k in names if ".lora_A" in k}
    assert len(adapted) == 2 * 7
    assert all(".language_model.layers." in name for name in adapted)


def test_a_regex_for_other_module_names_fails_clearly() -> None:
    """Gemma 4's text-only checkpoints name their layers `model.layers...`, not `model.language_model...`."""
    from transformers import Gemma4ForCausalLM

    from dolphin_train.model.adapters import new_adapter, prepare_base_for_adapter

    cfg = validate_mapping({"base_model": "unused", "datasets": [{"path": "unused.jsonl"}], "adapter": "lora",
                            "lora_target_modules": EXAMPLE_TARGETS})  # fmt: skip
    model = prepare_base_for_adapter(cfg, Gemma4ForCausalLM(tiny_text_config()))
    with pytest.raises(DolphinError, match=r"matches no module of Gemma4ForCausalLM; .* model\.layers\.0\.self_attn"):
        new_adapter(cfg, model, [])


def test_plan_knows_gemma4_31b() -> None:
    """30.7B parameters (Google's published count); the example's regex finds the text decoder's layers."""
    from dolphin_train.plan.report import make_plan

    cfg = validate_mapping({"base_model": "google/gemma-4-31B", "datasets": [{"path": "unused.jsonl"}],
                            "adapter": "qlora", "load_in_4bit": True, "lora_r": 16,
                            "lora_target_modules": EXAMPLE_TARGETS, "sequence_len": 2048})  # fmt: skip
    plan = make_plan(cfg, 1, 80 * 2**30, "cuda")
    trainable = plan.memory.params.trainable
    assert plan.memory.params.total - trainable == 30_697_345_280
    # r=16 LoRA on 60 layers' q/k/o and MLP projections, and on v in the 50 sliding layers (the global layers'
    # keys double as values): r x (in + out) each.
    per_layer = 3 * 16 * (5376 + 21504)
    sliding, full = 16 * (5376 + 32 * 256) * 2 + 16 * (5376 + 16 * 256) * 2, 16 * (5376 + 32 * 512) * 2
    full += 16 * (5376 + 4 * 512)
    assert trainable == 60 * per_layer + 50 * sliding + 10 * full


# ---- gemma4_hybrid_attn_impl -------------------------------------------------------------------------------


def test_hybrid_choice_follows_the_machine() -> None:
    cfg = validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], "gemma4_hybrid_attn_impl": True,
                            "attn_implementation": "flash_attention_2"})  # fmt: skip
    assert resolve_attention(cfg, CUDA_FLASH)[0] == HYBRID
    name, note = resolve_attention(cfg, CUDA_NO_FLASH)
    assert name == "sdpa" and "flash-attn is not installed" in note
    name, note = resolve_attention(cfg, CPU)
    assert name == "sdpa" and "no CUDA device" in note


def test_hybrid_refuses_another_backend_and_a_model_without_the_layer_mix() -> None:
    from transformers import LlamaConfig

    from dolphin_train.model.attention import check_hybrid_layers

    with pytest.raises(ConfigError, match="gemma4_hybrid_attn_impl runs the sliding-window layers under"):
        validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], "gemma4_hybrid_attn_impl": True,
                          "attn_implementation": "sdpa"})  # fmt: skip
    with pytest.raises(DolphinError, match="does not mix sliding-window and global"):
        check_hybrid_layers(LlamaConfig())
    check_hybrid_layers(tiny_text_config())


def _reference_flash(calls: list) -> Any:
    """What flash-attn computes for a sliding-window layer from the position ids alone (it gets no mask):
    causal, within each packed sequence, at most `sliding_window` keys back. Records the layers it served."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, attention_mask))
        positions = kwargs["position_ids"][0]
        seq = torch.cumsum((positions == 0).long(), 0)
        i, j = torch.arange(len(positions))[:, None], torch.arange(len(positions))[None, :]
        allowed = (seq[:, None] == seq[None, :]) & (j <= i) & (i - j < kwargs["sliding_window"])
        return sdpa_attention_forward(module, query, key, value, allowed[None, None], **kwargs)

    return forward


def test_hybrid_attention_sends_only_sliding_layers_to_flash_and_keeps_packed_rows_apart() -> None:
    """Reference: each packed sequence run alone under SDPA. The global layer gets SDPA with transformers'
    block-diagonal mask; the sliding layer goes to the flash backend (a reference here), with no mask."""
    from transformers import AttentionInterface, Gemma4ForCausalLM

    from dolphin_train.model.attention import register_hybrid_attention, use_hybrid_attention

    calls: list = []
    AttentionInterface.register("reference_flash", _reference_flash(calls))
    torch.manual_seed(0)
    reference = Gemma4ForCausalLM._from_config(tiny_text_config(), attn_implementation="sdpa").eval()
    hybrid = Gemma4ForCausalLM._from_config(tiny_text_config(), attn_implementation=register_hybrid_attention())
    hybrid.load_state_dict(reference.state_dict())
    assert use_hybrid_attention(hybrid.eval(), sliding="reference_flash") == 1
    lengths = [9, 14, 7]
    ids = torch.randint(2, 2048, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = hybrid(input_ids=ids, position_ids=positions, use_cache=False).logits[0]  # as training runs
        alone = [reference(input_ids=part).logits[0] for part in ids.split(lengths, dim=1)]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert calls == [(0, None)]  # layer 0 is the sliding one; the global layer 1 stayed on SDPA


# ---- liger_rms_norm_gated ------------------------------------------------------------------------------------


def _runtime(device: str) -> RuntimeSettings:
    return RuntimeSettings(device=device, bf16=False, fp16=False, tf32=False, attn_implementation="sdpa",
                           attention_note="", world_size=1, launcher="single process")  # fmt: skip


def test_gated_rms_norms_are_fused_and_compute_the_same(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import Gemma4ForCausalLM
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNormGated

    from dolphin_train.model.load import fuse_gated_rms_norms

    model = torch.nn.ModuleDict({"norm": Qwen3_5RMSNormGated(16)})
    torch.nn.init.normal_(model["norm"].weight)
    x, gate = torch.randn(3, 16), torch.randn(3, 16)
    expected = model["norm"](x, gate)
    assert fuse_gated_rms_norms(model, _runtime("cpu")) == 0  # no Triton kernel to fuse into off CUDA
    assert fuse_gated_rms_norms(model, _runtime("cpu"), backend="aot_eager") == 1
    assert model["norm"]._compiled_call_impl is not None
    torch.testing.assert_close(model["norm"](x, gate), expected)
    with caplog.at_level(logging.INFO):
        assert fuse_gated_rms_norms(Gemma4ForCausalLM(tiny_text_config()), _runtime("cuda")) == 0
    assert "has no gated RMSNorm layers, nothing to fuse" in caplog.text


def test_gated_rms_norm_is_a_liger_kernel_choice() -> None:
    with pytest.raises(ConfigError, match="liger_kernel: false, but"):
        validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], "liger_kernel": False,
                          "liger_rms_norm_gated": True})  # fmt: skip


# ---- bnb_config_kwargs -----------------------------------------------------------------------------------


def _qlora(**keys: Any):
    return validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], "adapter": "qlora",
                             "load_in_4bit": True, **keys})  # fmt: skip


def test_bnb_config_kwargs_names_are_bitsandbytes_configs() -> None:
    from transformers import BitsAndBytesConfig

    from dolphin_train.config.schema import BNB_CONFIG_VALUES, BNB_TOP_LEVEL

    parameters = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    assert parameters == {*BNB_CONFIG_VALUES, *BNB_TOP_LEVEL}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"bnb_config_kwargs": {"bnb_4bit_use_double_qant": True}}, "did you mean `bnb_4bit_use_double_quant`"),
        ({"bnb_config_kwargs": {"load_in_4bit": True}}, "set the top-level `load_in_4bit` key"),
        ({"bnb_config_kwargs": {"bnb_4bit_quant_type": "nf3"}}, "'nf3' is not one of nf4, fp4"),
        ({"bnb_config_kwargs": {"llm_int8_threshold": "high"}}, "'high' is not a int or float"),
        ({"bnb_config_kwargs": {"bnb_4bit_compute_dtype": "float16"}, "bf16": True}, "contradicts the bfloat16"),
        ({"bnb_config_kwargs": {"bnb_4bit_quant_storage": "uint8"}, "fsdp": ["full_shard"]}, "under DeepSpeed/FSDP"),
        ({"bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}, "adapter": "lora", "load_in_4bit": False,
          "load_in_8bit": True}, "apply to load_in_4bit, not load_in_8bit"),
        ({"bnb_config_kwargs": {"llm_int8_threshold": 5.0}, "adapter": "lora", "load_in_4bit": False},
         "neither load_in_4bit nor load_in_8bit"),
    ],
)
def test_bnb_config_kwargs_that_cannot_apply_are_refused(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _qlora(**keys)


def test_bnb_config_kwargs_reach_the_quantisation_config() -> None:
    from dolphin_train.model.adapters import quantization_config

    default = quantization_config(_qlora(), _runtime("cpu"))
    assert default.bnb_4bit_use_double_quant and default.bnb_4bit_quant_type == "nf4"
    chosen = quantization_config(
        _qlora(bnb_config_kwargs={"bnb_4bit_use_double_quant": False, "bnb_4bit_quant_type": "fp4",
                                  "llm_int8_skip_modules": ["lm_head"]}), _runtime("cpu"))  # fmt: skip
    assert not chosen.bnb_4bit_use_double_quant and chosen.bnb_4bit_quant_type == "fp4"
    assert chosen.llm_int8_skip_modules == ["lm_head"]


def test_plan_counts_the_quantisation_constants_double_quantisation_saves() -> None:
    """Per 64 values: 32 bytes of 4-bit codes and a float32 scale; with double quantisation an 8-bit scale
    plus a float32 per 256 blocks (hand computation), read from each quantised weight."""
    import bitsandbytes as bnb

    from dolphin_train.plan.memory import _stored_bytes

    values = 256 * 1024
    for double, per_64 in ((False, 32 + 4), (True, 32 + 1 + 4 / 256)):
        layer = bnb.nn.Linear4bit(1024, 256, bias=False, compress_statistics=double)
        assert _stored_bytes(layer.weight) == int(values / 64 * per_64)


def test_example_double_quant_shrinks_the_planned_weights(tmp_path: Path, gemma4_dir: Path) -> None:
    from dolphin_train.plan.report import make_plan

    def weights(double: bool) -> int:
        raw = _example_run(tmp_path, gemma4_dir, bnb_config_kwargs={"bnb_4bit_use_double_quant": double})
        return make_plan(validate_mapping(raw), 1, 80 * 2**30, "cuda").memory.params.weight_bytes

    assert weights(False) > weights(True)


def test_repository_example_configs_still_validate() -> None:
    assert load_config(REPO / "configs/phi2-qlora.yml", {}).bnb_config_kwargs is None
