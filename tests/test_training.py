"""Training through the real assembly (config → data → model → Trainer): the loss is the mean over
every trainable token of the accumulated batch, so gradient accumulation and packing change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import REPO, tiny_config, write_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.recipe import set_up_run


class _CaptureGradients(TrainerCallback):
    """Copies every gradient just before the first optimizer step (after clipping, which tests disable)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _first_step_gradients(tmp_path: Path, **overrides) -> dict[str, torch.Tensor]:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:8]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    raw = tiny_config(tmp_path, data, max_steps=1, max_grad_norm=0.0, learning_rate=1e-3, **overrides)
    run = set_up_run(validate_mapping(raw))
    capture = _CaptureGradients()
    run.trainer.add_callback(capture)
    run.trainer.train()
    assert capture.grads
    return capture.grads


def _assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_gradient_accumulation_equals_a_larger_batch(tmp_path: Path) -> None:
    """micro_batch_size 1 x 4 accumulation steps == micro_batch_size 4 x 1, on the same rows, even
    though the rows hold different numbers of trainable tokens (a per-micro-batch mean would differ)."""
    accumulated = _first_step_gradients(tmp_path / "a", micro_batch_size=1, gradient_accumulation_steps=4)
    one_batch = _first_step_gradients(tmp_path / "b", micro_batch_size=4, gradient_accumulation_steps=1)
    _assert_same_gradients(accumulated, one_batch)


def test_packed_and_unpacked_batches_give_the_same_gradients(tmp_path: Path) -> None:
    """All 8 conversations in one optimizer step: packed into rows of 1024 tokens, or one per row."""
    unpacked = _first_step_gradients(tmp_path / "u", micro_batch_size=8, sequence_len=1024)
    packed = _first_step_gradients(tmp_path / "p", micro_batch_size=8, sequence_len=1024, sample_packing=True)
    _assert_same_gradients(unpacked, packed)


def _eval_loss(tmp_path: Path, **overrides) -> tuple[float, float]:
    """(the trainer's eval_loss, the mean over trained tokens of each eval conversation run alone)."""
    from dolphin_train.train.trainer import trained_targets

    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:40]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    raw = tiny_config(tmp_path, data, val_set_size=0.5, sequence_len=1024, **overrides)
    run = set_up_run(validate_mapping(raw))
    reported = run.trainer.evaluate()["eval_loss"]
    model = run.trainer.model.eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for row in run.prepared.eval:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = trained_targets(labels)
            if n:
                loss_sum += float(model(input_ids=ids, labels=labels).loss) * n
                tokens += n
    return reported, loss_sum / tokens


@pytest.mark.parametrize("batching", [{"micro_batch_size": 1}, {"micro_batch_size": 3},
                                      {"micro_batch_size": 2, "sample_packing": True},
                                      {"micro_batch_size": 3, "chunked_cross_entropy": True}],
                         ids=["one per batch", "three per batch", "packed", "chunked loss"])  # fmt: skip
def test_eval_loss_is_the_mean_over_trained_tokens_however_it_is_batched(tmp_path: Path, batching: dict) -> None:
    """Conversations of different lengths: a mean of per-batch means would weight short ones up."""
    reported, reference = _eval_loss(tmp_path, **batching)
    assert reported == pytest.approx(reference, rel=1e-5)


def test_new_token_embeddings_start_at_the_mean(tmp_path: Path) -> None:
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import load_model
    from dolphin_train.model.tokenizer import load_tokenizer

    cfg = validate_mapping(tiny_config(tmp_path))
    tok = load_tokenizer(cfg)
    assert tok.new_token_ids == [2048, 2049]  # <|im_end|> (eos) then <|im_start|>
    model = load_model(cfg, resolve_runtime(cfg), tok)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.shape[0] == 2050
        mean = weight[:2048].mean(dim=0)
        torch.testing.assert_close(weight[2048], mean)
        torch.testing.assert_close(weight[2049], mean)
    assert model.generation_config.eos_token_id == 2048 and model.config.pad_token_id == 1


@pytest.mark.slow
def test_embedded_default_trains_and_saves_a_loadable_chat_model(tmp_path: Path, capsys) -> None:
    """The README's first command, shortened: the tiny default config trains, its eval loss falls, and
    the output directory is a standard Hugging Face model with a ChatML tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolphin_train.cli import main

    out = tmp_path / "out"
    code = main([
        str(REPO / "configs/tiny-chat.yml"), "--num_epochs", "2",
        "--output_dir", str(out), "--dataset_prepared_path", str(tmp_path / "prepared"),
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 2.0
    assert {"dolphin-train", "torch", "transformers", "datasets"} <= set(summary["versions"])
    assert len(summary["config_hash"]) == 16 and len(summary["data_fingerprint"]) == 16
    assert (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache is True
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    capsys.readouterr()
    assert main(["chat", str(out), "--prompt", "Hello!", "--max-new-tokens", "24"]) == 0
    answer = capsys.readouterr().out
    assert answer.strip() and "<|im_start|>" not in answer and "<|im_end|>" not in answer


@pytest.mark.slow
def test_resume_from_latest_checkpoint(tmp_path: Path, capsys) -> None:
    """`resume_from_checkpoint: true` continues from checkpoint-4: the second run trains only steps 5 and 6."""
    import re

    from dolphin_train.cli import main

    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, max_steps=4, save_steps=2, sample_packing=True))
    assert main([str(path)]) == 0
    assert (tmp_path / "out/checkpoint-4").is_dir()
    capsys.readouterr()
    assert main([str(path), "--max_steps", "6", "--resume_from_checkpoint", "true"]) == 0
    out = capsys.readouterr().out
    assert f"Resuming from {tmp_path / 'out/checkpoint-4'}: 4 of 6 steps done" in out
    assert [int(s) for s in re.findall(r"^step (\d+)/6  loss", out, re.MULTILINE)] == [5, 6]
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert summary["steps"] == 6


def test_packed_rows_are_reshuffled_each_epoch_with_the_seed(tmp_path: Path) -> None:
    def epoch_orders(path: Path) -> list[list[list[int]]]:
        run = set_up_run(validate_mapping(tiny_config(path, sample_packing=True, micro_batch_size=1)))
        loader = run.trainer.get_train_dataloader()
        orders = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            orders.append([batch["input_ids"][0, :12].tolist() for batch in loader])
        return orders

    first, second = epoch_orders(tmp_path / "a"), epoch_orders(tmp_path / "b")
    assert first == second  # seeded: the same orders on every run
    assert sorted(first[0]) == sorted(first[1]) and first[0] != first[1]  # same rows, new order each epoch


def test_llama3_vocabulary_trains_evaluates_and_saves_with_the_default_chunked_loss(
    tmp_path: Path, llama3_dir: str, capsys
) -> None:
    """With Llama-3's 128k vocabulary the chunked loss is on by default: training, evaluation and the
    saved model (a plain output head again) all go through it."""
    from safetensors import safe_open
    from transformers import LlamaConfig

    from dolphin_train.cli import main

    model_dir = tmp_path / "model"
    LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(model_dir)  # fmt: skip
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:40]]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows), base_model=str(model_dir),
                      tokenizer_config=llama3_dir, max_steps=2, micro_batch_size=2, val_set_size=0.25)  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", raw))]) == 0
    assert "Chunked cross-entropy: the full logits are never materialised" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out/run_summary.json").read_text())
    assert 0 < summary["final_eval_loss"] < 20
    with safe_open(str(tmp_path / "out/model.safetensors"), "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in ("lm_head.weight", "model.embed_tokens.weight")}
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] and shapes["lm_head.weight"][0] > 128256
