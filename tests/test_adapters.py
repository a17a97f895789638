"""LoRA and QLoRA training on the CPU (bitsandbytes 4-bit works there), 8-bit optimizers, merging, chat."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, tiny_config, write_config, write_jsonl
from dolphin_train.cli import main
from dolphin_train.config.load import validate_mapping

pytestmark = pytest.mark.slow


def _data(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:24]]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def _train(tmp_path: Path, base_dir: Path, **overrides) -> Path:
    cfg = tiny_config(tmp_path, _data(tmp_path), base_model=str(base_dir), train_from_scratch=False,
                      max_steps=3, sequence_len=256, sample_packing=True, micro_batch_size=2, **overrides)  # fmt: skip
    path = write_config(tmp_path / "c.yml", cfg)
    assert main([str(path)]) == 0
    return path


def _adapter_keys(out: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_lora_trains_adapter_and_only_the_new_tokens_rows(tmp_path: Path, base_dir: Path) -> None:
    """Two tokens added (the ChatML markers): besides LoRA, only their rows of the input embedding and of the
    head train (2 x 192 values each here), not the 2,050 x 192 matrices. With the chunked loss the head is
    swapped during training: a checkpoint saved then has the same keys."""
    from safetensors.torch import load_file

    from dolphin_train.recipe import set_up_run

    keys = {"adapter": "lora", "lora_r": 4, "learning_rate": 1e-3, "chunked_cross_entropy": True, "save_steps": 2}
    cfg = tiny_config(tmp_path / "setup", _data(tmp_path), base_model=str(base_dir), train_from_scratch=False, **keys)
    trained = {n: tuple(p.shape) for n, p in set_up_run(validate_mapping(cfg)).trainer.model.named_parameters()
               if p.requires_grad and "lora_" not in n}  # fmt: skip
    assert sorted(trained.values()) == [(2, 192), (2, 192)] and all("trainable_tokens_delta" in n for n in trained)
    _train(tmp_path, base_dir, **keys)
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and not config["modules_to_save"]
    assert config["trainable_token_indices"] == {"embed_tokens": [2048, 2049], "lm_head": [2048, 2049]}
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert {tuple(v.shape) for k, v in saved.items() if "trainable_tokens_delta" in k} == {(2, 192)}
    assert any("lora_A" in k for k in saved) and _adapter_keys(out / "checkpoint-2") == list(saved)


def test_embeddings_named_in_modules_to_save_train_in_full(tmp_path: Path, base_dir: Path) -> None:
    _train(tmp_path, base_dir, adapter="lora", lora_r=4, lora_modules_to_save=["embed_tokens", "lm_head"])
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"] and not config["trainable_token_indices"]
    keys = _adapter_keys(tmp_path / "out")
    assert any("embed_tokens" in k for k in keys) and any("lm_head" in k for k in keys)


def test_the_same_adapter_config_trains_the_same_adapter(tmp_path: Path, base_dir: Path) -> None:
    """`seed` decides LoRA's random initial matrices, whatever ran earlier in the process."""
    from safetensors.torch import load_file

    first, second = (load_file(_train(tmp_path / run, base_dir, adapter="lora", lora_r=4).parent
                               / "out/adapter_model.safetensors") for run in ("a", "b"))  # fmt: skip
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=0, rtol=0)


def test_qlora_trains_over_4bit_weights_and_merges_dequantised(tmp_path: Path, base_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from dolphin_train.post.merge import load_base

    path = _train(tmp_path, base_dir, adapter="qlora", load_in_4bit=True, lora_r=4, learning_rate=1e-3,
                  optimizer="paged_adamw_8bit")  # fmt: skip
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists()
    assert main(["merge-lora", str(path)]) == 0
    merged_dir = out / "merged"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == 2050
    # Reference: the 4-bit base dequantised, with the adapter applied unmerged.
    from dolphin_train.config.load import load_config
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.adapters import quantization_config

    cfg = load_config(path)
    base = load_base(str(base_dir), "float32", quantization_config(cfg, resolve_runtime(cfg)))
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reference = PeftModel.from_pretrained(base, str(out)).eval()
    ids = tokenizer("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def _merged_equals_base_plus_adapter(tmp_path: Path, base_dir: Path) -> tuple[Any, Any]:
    """Merge the adapter in tmp_path/out into base_dir with the CLI; its logits must equal the base model
    with the adapter applied by peft. Returns the merged model and its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert main(["merge-lora", "--base", str(base_dir), "--adapter", str(out), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reference = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(0, len(tokenizer), (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    return merged, tokenizer


def test_merge_lora_equals_base_plus_adapter(tmp_path: Path, base_dir: Path) -> None:
    _train(tmp_path, base_dir, adapter="lora", lora_r=8, learning_rate=5e-3, peft_use_rslora=True)
    merged, tokenizer = _merged_equals_base_plus_adapter(tmp_path, base_dir)
    assert merged.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_adapter_without_embeddings_is_rejected_when_tokens_are_added(tmp_path: Path, base_dir: Path, capsys) -> None:
    cfg = tiny_config(tmp_path, _data(tmp_path), base_model=str(base_dir), train_from_scratch=False, max_steps=1,
                      adapter="lora", lora_modules_to_save=["lm_head"])  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", cfg))]) == 1
    err = capsys.readouterr().err
    assert "leaves out ['embed_tokens']" in err and "Traceback" not in err


def _optimizer_kind(optimizer: Any) -> str:
    """What the run's optimizer really is: class, fusion, and the dtype and paging of its states."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    states = [v for state in inner.state.values() for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in states})
    library = type(inner).__module__.split(".")[0]
    paged, fused = bool(getattr(inner, "is_paged", False)), bool(inner.defaults.get("fused"))
    return f"{library}.{type(inner).__name__} fused={fused} paged={paged} states={','.join(dtypes)}"


@pytest.mark.parametrize(("optimizer", "kind"), [
    ("adamw_8bit", "bitsandbytes.AdamW fused=False paged=False states=float32,uint8"),
    ("paged_adamw_8bit", "bitsandbytes.AdamW fused=False paged=True states=float32,uint8"),
    ("adamw_torch_fused", "torch.AdamW fused=True paged=False states=float32"),
    ("adafactor", "transformers.Adafactor fused=False paged=False states=float32"),
    ("adamw_torch", "torch.AdamW fused=False paged=False states=float32"),
])  # fmt: skip
def test_optimizers_train_a_tiny_model(tmp_path: Path, optimizer: str, kind: str) -> None:
    """The optimizer named is the one that steps (8-bit optimizers keep uint8 states, beside the float32
    ones bitsandbytes keeps for embeddings and small tensors), and it trains to finite weights."""
    from dolphin_train.recipe import set_up_run

    cfg = tiny_config(tmp_path, _data(tmp_path), max_steps=2, sequence_len=256, sample_packing=True,
                      micro_batch_size=4, optimizer=optimizer, learning_rate=1e-3)  # fmt: skip
    run = set_up_run(validate_mapping(cfg))
    run.trainer.train()
    assert _optimizer_kind(run.trainer.optimizer) == kind
    assert run.trainer.state.global_step == 2
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() for p in run.trainer.model.parameters())


def test_tiny_phi_trains_with_qlora(tmp_path: Path) -> None:
    from transformers import PhiConfig, PhiForCausalLM

    base = tmp_path / "phi"
    torch.manual_seed(0)
    PhiForCausalLM(PhiConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=512)).save_pretrained(base)  # fmt: skip
    _train(tmp_path, base, adapter="qlora", load_in_4bit=True, lora_target_linear=True, learning_rate=1e-3)
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert {"q_proj", "dense", "fc1", "fc2"} <= {name.rsplit(".", 1)[-1] for name in config["target_modules"]}


def test_chat_prompt_answers_in_chatml(tmp_path: Path, base_dir: Path, capsys, monkeypatch) -> None:
    """`chat --prompt` on an adapter: the model sees the system message and the prompt in ChatML, with the
    generation header; the answer printed is the text it generated (decoded without special tokens)."""
    import dolphin_train.post.chat as chat_module

    path = _train(tmp_path, base_dir, adapter="lora", learning_rate=1e-3)
    seen = []

    def recording_reply(model, tokenizer, messages, out, max_new_tokens, temperature):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        answer = real_reply(model, tokenizer, messages, out, max_new_tokens, temperature)
        seen.append((prompt, answer))
        return answer

    real_reply = chat_module.reply
    monkeypatch.setattr(chat_module, "reply", recording_reply)
    capsys.readouterr()
    assert main(["chat", str(path), "--prompt", "Hi", "--max-new-tokens", "8", "--system", "Be brief."]) == 0
    printed = capsys.readouterr().out
    [(prompt, answer)] = seen
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert answer.strip() and printed == answer + "\n" and "<|im_" not in printed


def test_dora_and_continuing_from_a_saved_adapter(tmp_path: Path, base_dir: Path) -> None:
    _train(tmp_path / "first", base_dir, adapter="lora", peft_use_dora=True, learning_rate=1e-3)
    first = tmp_path / "first/out"
    assert json.loads((first / "adapter_config.json").read_text())["use_dora"] is True
    _train(tmp_path / "second", base_dir, adapter="lora", peft_use_dora=True, lora_model_dir=str(first))
    from safetensors.torch import load_file

    before = load_file(str(first / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "second/out/adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained on from there


def test_tied_embeddings_stay_tied_through_lora_training_and_merge(tmp_path: Path) -> None:
    """Llama-3.2-1B ties its input and output embeddings. With new tokens both are trained in full next to
    the adapter; they must stay one matrix, or the merged model (saved tied) loses what the head learned."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "tied"
    config = AutoConfig.from_pretrained(REPO / "configs/tiny/model", tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    _train(tmp_path, base, adapter="lora", lora_r=4, learning_rate=5e-3)
    merged, _ = _merged_equals_base_plus_adapter(tmp_path, base)
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
