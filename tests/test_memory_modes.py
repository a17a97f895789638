"""Fitting more on one GPU: reserved tokens renamed instead of a larger vocabulary, checkpointing of every
N-th layer, activation offloading, `auto` memory settings from the plan, and the plan's figures for the
8B recipes docs/one-gpu.md quotes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from conftest import REPO, tiny_config, write_config, write_jsonl
from dolphin_train.cli import main
from dolphin_train.config.load import load_config, validate_mapping
from dolphin_train.errors import DolphinError
from dolphin_train.model.tokenizer import load_tokenizer
from dolphin_train.plan.memory import GiB
from dolphin_train.plan.report import make_plan, parse_memory

CHATML_ON_RESERVED = {128002: "<|im_start|>", 128003: "<|im_end|>"}


def _llama3_config(tmp_path: Path, llama3_dir: str, **keys) -> dict:
    return tiny_config(tmp_path, tokenizer_config=llama3_dir, tokens=[],
                       special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"}, **keys)  # fmt: skip


def test_reserved_tokens_become_the_chatml_markers_and_nothing_is_resized(tmp_path: Path, llama3_dir: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import load_model

    base = AutoTokenizer.from_pretrained(llama3_dir)
    cfg = validate_mapping(_llama3_config(tmp_path, llama3_dir, added_tokens_overrides=CHATML_ON_RESERVED))
    tok = load_tokenizer(cfg)
    assert len(tok.tokenizer) == len(base)  # no new token
    assert tok.new_token_ids == [128002, 128003]  # the renamed rows are the ones to initialise and train
    ids = tok.tokenizer("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == 128002 and 128003 in ids and tok.tokenizer.eos_token_id == 128003
    saved = tmp_path / "saved"
    tok.tokenizer.save_pretrained(saved)
    assert AutoTokenizer.from_pretrained(saved).convert_tokens_to_ids("<|im_end|>") == 128003

    model_dir = tmp_path / "model"
    LlamaConfig(vocab_size=len(base), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(model_dir)  # fmt: skip
    cfg = validate_mapping(_llama3_config(tmp_path, llama3_dir, base_model=str(model_dir),
                                          added_tokens_overrides=CHATML_ON_RESERVED))  # fmt: skip
    model = load_model(cfg, resolve_runtime(cfg), load_tokenizer(cfg))
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == len(base)  # not resized
    torch.testing.assert_close(rows[128002], rows[:128002].mean(dim=0))  # started as new rows start


def test_plan_and_validate_say_which_ids_the_markers_get(
    tmp_path: Path, llama3_dir: str, capsys: pytest.CaptureFixture
) -> None:
    raw = _llama3_config(tmp_path, llama3_dir, added_tokens_overrides=CHATML_ON_RESERVED)
    path = str(write_config(tmp_path / "c.yml", raw))
    assert main(["plan", path, "--device", "cpu"]) == 0
    assert "<|im_start|> 128002 (renamed), <|im_end|> 128003 (renamed)" in " ".join(capsys.readouterr().out.split())
    assert main(["validate", path, "--micro_batch_size", "auto"]) == 0
    out = capsys.readouterr().out
    assert "# tokens: <|im_start|> 128002 (renamed), <|im_end|> 128003 (renamed)" in out
    assert "# auto settings for 1 x" in out and "micro_batch_size" in out


@pytest.mark.parametrize(("overrides", "said"), [
    ({999999: "<|x|>"}, "999999: no such token id"),
    ({128002: "<|begin_of_text|>"}, "is already token 128000"),
])  # fmt: skip
def test_overrides_that_cannot_work_are_named(tmp_path: Path, llama3_dir: str, overrides: dict, said: str) -> None:
    cfg = validate_mapping(_llama3_config(tmp_path, llama3_dir, added_tokens_overrides=overrides))
    with pytest.raises(DolphinError, match=said):
        load_tokenizer(cfg)


# ---- checkpointing every N-th layer and activation offloading train the same model -----------------------


def _first_step_gradients(tmp_path: Path, **keys) -> dict[str, torch.Tensor]:
    from transformers import TrainerCallback

    from dolphin_train.recipe import set_up_run

    class Capture(TrainerCallback):
        grads: ClassVar[dict[str, torch.Tensor]] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            Capture.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:8]]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_steps=1, max_grad_norm=0.0,
                      micro_batch_size=8, sequence_len=1024, **keys)  # fmt: skip
    run = set_up_run(validate_mapping(raw))
    run.trainer.add_callback(Capture())
    run.trainer.train()
    return Capture.grads


def test_checkpointing_every_second_layer_gives_the_same_gradients(tmp_path: Path) -> None:
    """(Offloading, which copies the checkpointed inputs to pinned CPU memory and back, needs a GPU: the
    same comparison runs in tests/test_gpu.py.)"""
    plain = _first_step_gradients(tmp_path / "plain")
    other = _first_step_gradients(tmp_path / "other", gradient_checkpointing=True, gradient_checkpointing_layers=2)
    assert plain.keys() == other.keys()
    for name in plain:
        torch.testing.assert_close(other[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_options_reach_transformers(tmp_path: Path) -> None:
    from dataclasses import replace

    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.train.arguments import checkpointing_kwargs

    cfg = validate_mapping(tiny_config(tmp_path, gradient_checkpointing="offload", gradient_checkpointing_layers=3,
                                       gradient_checkpointing_kwargs={"use_reentrant": False}))  # fmt: skip
    on_a_gpu = replace(resolve_runtime(cfg), device="cuda")
    assert checkpointing_kwargs(cfg, on_a_gpu) == {"use_reentrant": False, "every_n_layers": 3, "offload": True}
    # On the CPU the activations are already in CPU memory: nothing to offload.
    assert checkpointing_kwargs(cfg, resolve_runtime(cfg)) == {"use_reentrant": False, "every_n_layers": 3}


def test_offloading_needs_checkpointing(tmp_path: Path) -> None:
    from dolphin_train.errors import ConfigError

    with pytest.raises(ConfigError, match="activation_offloading: true keeps the checkpointed layers' inputs"):
        validate_mapping(tiny_config(tmp_path, activation_offloading=True))


# ---- the plan: the 8B figures, and `auto` settings ---------------------------------------------------------

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B"  # shapes from the plan's table of known architectures


def _plan_8b(tmp_path: Path, llama3_dir: str, memory: str, **keys):
    settings = {"sequence_len": 4096, "micro_batch_size": 1, **keys}
    raw = tiny_config(tmp_path, base_model=LLAMA3_8B, tokenizer_config=llama3_dir, train_from_scratch=False,
                      sample_packing=True, pad_to_sequence_len=True, flash_attention=True, bf16="auto",
                      **settings)  # fmt: skip
    raw["special_tokens"] = {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return make_plan(load_config(write_config(tmp_path / "c.yml", raw)), gpus=1, gpu_memory=parse_memory(memory))


QLORA = {"adapter": "qlora", "load_in_4bit": True, "lora_r": 16, "optimizer": "adamw_8bit"}


def test_8b_qlora_at_4096_tokens_plans_under_8_gib(tmp_path: Path, llama3_dir: str) -> None:
    """Since the plan counts a layer's backward working memory (flash-attn's buffers, the MLP's gradients),
    offloading alone plans 8.1 GiB; the tiled MLP brings it under 8."""
    plan = _plan_8b(tmp_path, llama3_dir, "24GB", gradient_checkpointing="offload", tiled_mlp=True, **QLORA)
    assert plan.memory.total <= 8 * GiB, f"{plan.memory.total / GiB:.2f} GiB"


def test_8b_qlora_at_16k_tokens_with_offloading_plans_under_24_gib(tmp_path: Path, llama3_dir: str) -> None:
    plan = _plan_8b(tmp_path, llama3_dir, "24GB", gradient_checkpointing="offload", **{**QLORA, "sequence_len": 16384})
    assert plan.fits and plan.memory.total <= 24 * GiB


def test_8b_full_fine_tuning_on_one_gpu_plans_under_48_gib(tmp_path: Path, llama3_dir: str) -> None:
    plan = _plan_8b(tmp_path, llama3_dir, "48GB", gradient_checkpointing=True, bfloat16=True,
                    optimizer_in_backward=True, optimizer="adamw_torch_8bit", max_grad_norm=0)  # fmt: skip
    assert plan.memory.total <= 48 * GiB, f"{plan.memory.total / GiB:.2f} GiB"
    assert plan.memory.gradients <= 2 * 128258 * 4096  # one gradient at a time, never the model's 16 GB


def test_micro_batch_size_auto_chooses_for_the_gpu(tmp_path: Path, llama3_dir: str) -> None:
    auto = {**QLORA, "micro_batch_size": "auto", "gradient_checkpointing": "auto", "activation_offloading": "auto"}
    small, large = (_plan_8b(tmp_path / m, llama3_dir, m, **auto) for m in ("24GB", "80GB"))
    assert small.fits and large.fits
    choices = [(p.cfg.micro_batch_size, p.cfg.gradient_checkpointing) for p in (small, large)]
    assert choices[0] != choices[1]
    assert not large.cfg.gradient_checkpointing  # activations fit an 80 GB card: no recomputation
    assert small.auto and "auto settings for 1 x 22.4 GiB GPU" in small.auto[0]


def test_batch_size_is_kept_when_the_micro_batch_is_chosen(tmp_path: Path, llama3_dir: str) -> None:
    plan = _plan_8b(tmp_path, llama3_dir, "80GB", micro_batch_size="auto", batch_size=12, **QLORA)
    chosen = plan.cfg
    assert chosen.micro_batch_size * chosen.gradient_accumulation_steps == 12 and 12 % chosen.micro_batch_size == 0


@pytest.mark.slow
def test_a_run_with_auto_settings_says_what_it_chose(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tiny_config(tmp_path, max_steps=1, micro_batch_size="auto", gradient_checkpointing="auto", batch_size=8)
    assert main([str(write_config(tmp_path / "c.yml", raw))]) == 0
    out = capsys.readouterr().out
    assert "auto settings for 1 x" in out and "micro_batch_size" in out
    saved = (tmp_path / "out/dolphin_train_config.yml").read_text()
    assert "micro_batch_size: auto" not in saved  # the snapshot records the choice
