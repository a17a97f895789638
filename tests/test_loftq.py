"""LoftQ (`peft: {loftq_config: ...}`): the initialisation against its definition, training through the recipe,
merge and chat over the quantised base the adapter trained on, the plan, and config errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, tiny_config, write_config, write_jsonl
from dolphin_train.cli import main

LOFTQ = {"adapter": "lora", "lora_r": 4, "lora_alpha": 2, "peft": {"loftq_config": {"loftq_bits": 4}}}


def _structured_weight(out: int = 96, inp: int = 64, rank: int = 6) -> torch.Tensor:
    """A weight with a few strong directions plus noise, as trained weights have."""
    torch.manual_seed(0)
    return torch.randn(out, rank) @ torch.randn(rank, inp) * 0.3 + torch.randn(out, inp) * 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_base_plus_adapter_is_closer_to_the_weight_than_the_quantised_base(bits: int) -> None:
    """Reference: bitsandbytes' own round trip for Q, and the residual's best rank-r fit (a truncated SVD)
    for the adapter, scaled as LoRA's forward pass scales it."""
    from dolphin_train.model.loftq import loftq_decomposition, quantised

    weight, rank, scaling = _structured_weight(), 8, 0.5
    q, lora_a, lora_b = loftq_decomposition(weight, bits, rank, scaling)
    assert torch.equal(q, quantised(weight, bits)) and not torch.equal(q, weight)
    assert lora_a.shape == (rank, 64) and lora_b.shape == (96, rank)
    u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
    best_fit = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(scaling * lora_b @ lora_a, best_fit, atol=1e-5, rtol=1e-4)
    quantisation_error = torch.linalg.norm(weight - q)
    assert torch.linalg.norm(weight - (q + scaling * lora_b @ lora_a)) < 0.9 * quantisation_error


def test_a_rank_above_the_layer_width_pads_the_adapter_with_zeros() -> None:
    from dolphin_train.model.loftq import loftq_decomposition

    weight = _structured_weight(12, 8)
    q, lora_a, lora_b = loftq_decomposition(weight, 4, 16, 2.0)
    assert lora_a.shape == (16, 8) and lora_b.shape == (12, 16)
    assert not lora_a[8:].any() and not lora_b[:, 8:].any()
    torch.testing.assert_close(q + 2.0 * lora_b @ lora_a, weight, atol=1e-5, rtol=1e-4)  # full rank: exact


def test_more_loftq_rounds_quantise_what_the_low_rank_part_leaves() -> None:
    from dolphin_train.model.loftq import loftq_decomposition, quantised

    weight = _structured_weight()
    q1, a1, b1 = loftq_decomposition(weight, 4, 8, 1.0, iterations=1)
    q3, a3, b3 = loftq_decomposition(weight, 4, 8, 1.0, iterations=3)
    assert not torch.equal(q1, q3)
    # Round 3 quantised weight - (round 2's low-rank part): Q3 is a quantisation grid point set, not Q1.
    assert torch.equal(quantised(q3, 4), q3)
    assert torch.linalg.norm(weight - q3 - b3 @ a3) <= torch.linalg.norm(weight - q1 - b1 @ a1) * 1.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft's LoftQ runs on CUDA only")
def test_loftq_decomposition_equals_peft_when_alpha_equals_rank() -> None:
    """peft leaves out LoRA's scaling; with alpha = r (scaling 1) the two must agree."""
    from peft.utils.loftq_utils import loftq_init

    from dolphin_train.model.loftq import loftq_decomposition

    weight = _structured_weight(256, 128)
    ours = loftq_decomposition(weight, 4, 8, 1.0, iterations=2)
    theirs = loftq_init(weight, num_bits=4, reduced_rank=8, num_iter=2)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[2] @ ours[1], (theirs[2] @ theirs[1]).cpu(), atol=1e-4, rtol=1e-3)


def test_a_loftq_initialised_model_starts_close_to_the_original() -> None:
    """The point of LoftQ: quantised base + adapter gives logits closer to the original model's than the
    quantised base alone (the adapter disabled). A random model's quantisation error is spread over every
    direction, so the rank is a third of the width here (0.44 of the error is left); trained weights
    concentrate it more."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from dolphin_train.config.load import validate_mapping
    from dolphin_train.config.schema import LoftQSettings
    from dolphin_train.model.adapters import EmbeddingTraining, lora_config
    from dolphin_train.model.loftq import initialise_with_loftq

    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "configs/tiny/model")).eval()
    ids = torch.randint(0, 2048, (2, 24))
    with torch.no_grad():
        expected = original(input_ids=ids).logits
    cfg = validate_mapping(tiny_config(Path("/unused"), **{**LOFTQ, "lora_r": 64, "lora_alpha": 32}))
    model = get_peft_model(original, lora_config(cfg, original, EmbeddingTraining())).eval()
    assert initialise_with_loftq(model, LoftQSettings(loftq_bits=4)) == 28  # 4 decoder layers x 7 linear layers
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            quantised_only = model(input_ids=ids).logits
    assert torch.linalg.norm(with_adapter - expected) < 0.6 * torch.linalg.norm(quantised_only - expected)


def _config(tmp_path: Path, base_dir: Path, **overrides: Any) -> Path:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:24]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = tiny_config(tmp_path, data, base_model=str(base_dir), train_from_scratch=False, max_steps=3,
                      sequence_len=256, sample_packing=True, micro_batch_size=2, **overrides)  # fmt: skip
    return write_config(tmp_path / "c.yml", cfg)


def _trained_model(base_dir: Path, adapter: Path, tokenizer: Any) -> Any:
    """What training ended with, rebuilt independently: the original base with every adapted layer's weight
    quantised to NF4 and back (LoftQ's base after one round), then the trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dolphin_train.model.loftq import quantised

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(quantised(module.weight.float(), 4))
    return PeftModel.from_pretrained(base, str(adapter)).eval()


@pytest.mark.slow
def test_loftq_trains_and_merges_into_the_base_it_trained_over(tmp_path: Path, base_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolphin_train.post.chat import load_for_chat

    path = _config(tmp_path, base_dir, **LOFTQ, learning_rate=5e-3, save_steps=2)
    assert main([str(path)]) == 0
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # a plain adapter: loading it re-quantises nothing
    saved = load_file(str(out / "loftq_base.safetensors"))
    assert len(saved) == 28 and (out / "checkpoint-2/loftq_base.safetensors").is_file()
    assert main(["merge-lora", str(path)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    trained = _trained_model(base_dir, out, tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 40))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        chat_model, _ = load_for_chat(out)
        torch.testing.assert_close(chat_model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        # The adapter over the original base (what a LoftQ-unaware merge makes) is another model.
        original = AutoModelForCausalLM.from_pretrained(base_dir)
        original.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        naive = PeftModel.from_pretrained(original, str(out)).eval()
        assert not torch.allclose(naive(input_ids=ids).logits, expected, atol=1e-3)


@pytest.mark.slow
def test_a_resumed_loftq_run_reads_its_base_and_ends_as_an_uninterrupted_one(
    tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    import dolphin_train.model.loftq as loftq

    path = _config(tmp_path, base_dir, **LOFTQ, learning_rate=5e-3, save_steps=2)
    assert main([str(path)]) == 0
    out = tmp_path / "out"
    uninterrupted = load_file(str(out / "adapter_model.safetensors"))

    def not_again(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a resumed run recomputed LoftQ instead of reading its saved base")

    monkeypatch.setattr(loftq, "loftq_decomposition", not_again)
    assert main([str(path), "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_continuing_a_loftq_adapter_keeps_its_base(tmp_path: Path, base_dir: Path) -> None:
    from safetensors.torch import load_file

    assert main([str(_config(tmp_path / "first", base_dir, **LOFTQ))]) == 0
    first = tmp_path / "first/out"
    plain_lora = {k: v for k, v in LOFTQ.items() if k != "peft"}
    assert main([str(_config(tmp_path / "second", base_dir, **plain_lora, lora_model_dir=str(first)))]) == 0
    before, after = (load_file(str(d / "loftq_base.safetensors")) for d in (first, tmp_path / "second/out"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_plan_counts_a_loftq_run_as_lora_over_its_compute_dtype(
    tmp_path: Path, base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LoftQ's base is held in the compute dtype, as LoRA's (its float32 copies live one layer at a time, on
    the GPU before the model moves there): the plan's estimate is LoRA's, and its counts match the model."""
    from dolphin_train.config.load import load_config
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import load_model
    from dolphin_train.model.tokenizer import load_tokenizer
    from dolphin_train.plan.report import model_facts, plan_memory, planned_runtime

    plain = {k: v for k, v in LOFTQ.items() if k != "peft"}
    estimates = {}
    for name, keys in (("loftq", LOFTQ), ("lora", plain)):
        cfg = load_config(_config(tmp_path / name, base_dir, **keys), {})
        tok = load_tokenizer(cfg)
        facts = model_facts(cfg, tok)
        estimates[name] = plan_memory(cfg, facts, planned_runtime(cfg, gpus=1, device="cuda"))
    assert estimates["loftq"].total == estimates["lora"].total
    model = load_model(cfg, resolve_runtime(cfg), tok)
    assert estimates["loftq"].params.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert main(["plan", str(tmp_path / "loftq/c.yml"), "--gpus", "1", "--gpu-memory", "24"]) == 0
    assert "base (4-bit LoftQ values) + adapter" in capsys.readouterr().out


@pytest.mark.parametrize(("peft", "extra", "named"), [
    ({"loftq_config": {"loftq_bits": 2}}, {}, "peft.loftq_config.loftq_bits: 2 is not allowed"),
    ({"loftq_config": {"loftq_iter": 0}}, {}, "peft.loftq_config.loftq_iter: 0 is not allowed"),
    ({"loftq_config": {"loftq_bitz": 4}}, {}, "peft.loftq_config.loftq_bitz: unknown key (did you mean `loftq_bits`?)"),
    ({"loftq_confg": {"loftq_bits": 4}}, {}, "peft.loftq_confg: unknown key (did you mean `loftq_config`?)"),
    ({"loftq_config": {}}, {"adapter": "qlora", "load_in_4bit": True}, "peft.loftq_config: LoftQ quantises the base"),
    ({"loftq_config": {}}, {"adapter": None}, "peft.loftq_config: LoftQ quantises the base"),
    ({"loftq_config": {}}, {"lora_model_dir": "somewhere"}, "lora_model_dir continues a saved one"),
])  # fmt: skip
def test_bad_loftq_settings_fail_at_load_naming_the_key(
    tmp_path: Path, peft: dict[str, Any], extra: dict[str, Any], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, **{**LOFTQ, "peft": peft, **extra}))
    assert main(["validate", str(path)]) == 2
    assert named in capsys.readouterr().err


def test_axolotl_loftq_example_keys_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The keys of axolotl's examples/llama-2/loftq.yml, as it writes them (`lora_model_dir:` empty)."""
    import yaml

    text = yaml.safe_dump(tiny_config(tmp_path, adapter="lora", lora_r=32, lora_alpha=16, lora_dropout=0.05,
                                      lora_target_linear=True))  # fmt: skip
    path = tmp_path / "c.yml"
    path.write_text(text + "lora_model_dir:\npeft:\n  loftq_config:\n    loftq_bits: 4\n")
    assert main(["validate", str(path)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["peft"] == {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
