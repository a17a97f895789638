"""Config loading: the Dolphin recipe loads unchanged; every mistake gets a precise message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REFERENCE, REPO, tiny_config, write_config
from dolphin_train.cli import main
from dolphin_train.config.load import load_config, validate_mapping
from dolphin_train.config.schema import OPTIMIZERS, Config
from dolphin_train.errors import ConfigError

DOLPHIN_29 = REFERENCE / "dolphin-2.9-llama3-8b.axolotl.yml"


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


MINIMAL = "base_model: m\ndatasets:\n  - path: d.jsonl\n    type: sharegpt\n"


def test_dolphin_29_reference_config_loads_unchanged() -> None:
    cfg = load_config(DOLPHIN_29)
    assert cfg.base_model == "meta-llama/Meta-Llama-3-8B"
    assert len(cfg.datasets) == 15 and all(d.type == "sharegpt" for d in cfg.datasets)
    assert cfg.sequence_len == 4096 and cfg.sample_packing and cfg.pad_to_sequence_len
    assert cfg.optimizer == "adamw_8bit" and cfg.learning_rate == 2e-5 and cfg.micro_batch_size == 3
    assert cfg.bf16 == "auto" and cfg.fp16 is None and cfg.flash_attention
    assert cfg.special_tokens.eos_token == "<|im_end|>" and cfg.tokens == ["<|im_start|>", "<|im_end|>"]
    assert cfg.deepspeed == "deepspeed_configs/zero3_bf16.json"
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_shipped_llama3_config_differs_from_reference_only_in_dataset_paths() -> None:
    ours = yaml.safe_load((REPO / "configs/llama3-8b.yml").read_text())
    ref = yaml.safe_load(DOLPHIN_29.read_text())
    assert [Path(d["path"]).name for d in ours["datasets"]] == [Path(d["path"]).name for d in ref["datasets"]]
    for d in ours["datasets"] + ref["datasets"]:
        d.pop("path")
    ours.pop("dataset_prepared_path")
    ref.pop("dataset_prepared_path")
    assert ours == ref


def test_validate_command_accepts_llama3_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO / "configs/llama3-8b.yml")]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["bf16"] is False  # `auto` resolved on this CPU machine
    assert resolved["sequence_len"] == 4096 and resolved["lr_scheduler"] == "cosine"
    # flash_attention: true without a CUDA device: SDPA per conversation through our packed-attention entry point
    assert "attention dolphin_sdpa_varlen" in out


def test_misspelled_key_names_the_nearest_known_key(tmp_path: Path) -> None:
    problems = _problems(tmp_path, MINIMAL + "learnng_rate: 1e-5\n")
    assert problems == ["learnng_rate: unknown key (did you mean `learning_rate`?)"]


def test_misspelled_dataset_key_is_reported_with_its_position(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "base_model: m\ndatasets:\n  - path: d.jsonl\n    tpye: sharegpt\n")
    assert problems == ["datasets[0].tpye: unknown key (did you mean `type`?)"]


def test_bad_values_name_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    problems = _problems(tmp_path, MINIMAL + "optimizer: adamw_9bit\nmicro_batch_size: 0\nsequence_len: lots\n")
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "optimizer: 'adamw_9bit' is not allowed: unknown optimizer; allowed: adamw_torch" in joined
    assert "micro_batch_size: 0 is not allowed" in joined and "greater than or equal to 1" in joined
    assert "sequence_len: 'lots' is not allowed" in joined


def test_bad_choice_suggests_the_nearest_allowed_value(tmp_path: Path) -> None:
    problems = _problems(tmp_path, MINIMAL.replace("type: sharegpt", "type: sharegtp"))
    assert len(problems) == 1 and "datasets[0].type: 'sharegtp'" in problems[0]
    assert "(did you mean `sharegpt`?)" in problems[0]


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "datasets: []\nlearnng_rate: 1\nnum_epochs: -1\n")
    assert len(problems) == 4  # base_model missing, datasets empty, unknown key, bad num_epochs


def test_known_but_unimplemented_keys_fail_as_not_supported_yet(tmp_path: Path) -> None:
    problems = _problems(tmp_path, MINIMAL + "strict: true\ngroup_by_length: true\n")
    assert problems == ["strict: True is not supported yet", "group_by_length: True is not supported yet"]


def test_adapter_combinations_that_cannot_work_are_rejected(tmp_path: Path) -> None:
    problems = _problems(tmp_path, MINIMAL + "adapter: qlora\n")
    assert problems == ["adapter: qlora needs load_in_4bit: true"]
    problems = _problems(tmp_path, MINIMAL + "load_in_8bit: true\n")
    assert problems == ["load_in_4bit/load_in_8bit: quantised weights cannot be trained in full; set adapter"]
    problems = _problems(tmp_path, MINIMAL + "fsdp: [full_shard]\ndeepspeed: deepspeed_configs/zero3.json\n")
    assert problems == ["fsdp and deepspeed: choose one way to shard the model"]


def test_empty_values_mean_unset(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text(MINIMAL + "fp16:\nwandb_watch:\nresume_from_checkpoint:\nload_in_4bit: false\n")
    cfg = load_config(path)
    assert cfg.fp16 is None and cfg.wandb_watch is None and cfg.resume_from_checkpoint is None


def test_repeated_key_with_a_different_value_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ok.yml"
    path.write_text(MINIMAL + "logging_steps: 1\nlogging_steps: 1\n")
    assert load_config(path).logging_steps == 1
    problems = _problems(tmp_path, MINIMAL + "logging_steps: 1\nlogging_steps: 5\n")
    assert problems == ["logging_steps: set twice with different values (1, then 5 on line 6)"]


def test_config_is_immutable() -> None:
    cfg = validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}]})
    with pytest.raises(Exception, match="frozen"):
        cfg.learning_rate = 1.0  # type: ignore[misc]


def test_command_line_overrides(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path))
    cfg = load_config(path, {"learning_rate": 1e-5, "sample_packing": True})
    assert cfg.learning_rate == 1e-5 and cfg.sample_packing is True
    with pytest.raises(ConfigError, match="did you mean `learning_rate`"):
        load_config(path, {"learnig_rate": 1e-5})


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(MINIMAL + "learnng_rate: 1e-5\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learnng_rate: unknown key (did you mean `learning_rate`?)" in err
    assert "Traceback" not in err
    good = write_config(tmp_path / "good.yml", tiny_config(tmp_path))
    assert main(["validate", str(good), "--learning_rate", "3e-4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["learning_rate"] == 3e-4


def test_help_is_fast_and_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom dolphin_train.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "dolphin-train" in result.stdout


def test_optimizer_names_are_transformers_names() -> None:
    from transformers.training_args import OptimizerNames

    known = {o.value for o in OptimizerNames}
    assert set(OPTIMIZERS) <= known


def test_every_key_is_documented() -> None:
    for name, info in Config.model_fields.items():
        assert info.description, f"{name} has no description"


def test_validate_accepts_the_phi2_qlora_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO / "configs/phi2-qlora.yml")]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["adapter"] == "qlora" and resolved["load_in_4bit"] and resolved["trust_remote_code"] is False


@pytest.mark.parametrize(
    "name",
    ["zero1", "zero2", "zero3", "zero3_bf16", "zero3_bf16_cpuoffload_params", "zero3_bf16_cpuoffload_all"],
)
def test_shipped_deepspeed_configs_parse_and_validate(name: str, tmp_path: Path) -> None:
    import json

    path = REPO / "deepspeed_configs" / f"{name}.json"
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert stage in (1, 2, 3)
    cfg = load_config(write_config(tmp_path / "c.yml", tiny_config(tmp_path, deepspeed=str(path))))
    assert cfg.deepspeed == str(path)


def test_deepspeed_in_one_cpu_process_says_how_to_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, deepspeed=str(REPO / "deepspeed_configs/zero3.json")))
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "--num-processes 2" in err and "Traceback" not in err


def test_lora_target_linear_false_needs_named_modules(tmp_path: Path) -> None:
    problems = _problems(tmp_path, MINIMAL + "adapter: lora\nlora_target_linear: false\n")
    assert len(problems) == 1 and "lora_target_linear: false leaves LoRA nothing to adapt" in problems[0]
    cfg = validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], "adapter": "lora",
                            "lora_target_linear": False, "lora_target_modules": ["q_proj"]})  # fmt: skip
    assert cfg.lora_targets == ["q_proj"]
    assert validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}]}).lora_targets == "all-linear"


def test_tokenizer_type_chooses_the_class_that_loads_the_tokenizer(tmp_path: Path) -> None:
    from dolphin_train.errors import DolphinError
    from dolphin_train.model.tokenizer import load_tokenizer

    gpt2 = load_tokenizer(validate_mapping(tiny_config(tmp_path, tokenizer_type="GPT2Tokenizer")))
    assert type(gpt2.tokenizer).__name__ == "GPT2Tokenizer" and gpt2.tokenizer.is_fast
    with pytest.raises(DolphinError, match="tokenizer_type: 'LlamaModel' is not a transformers tokenizer class"):
        load_tokenizer(validate_mapping(tiny_config(tmp_path, tokenizer_type="LlamaModel")))


def test_tokenizer_use_fast_false_still_loads_the_fast_tokenizer_and_says_so(tmp_path: Path, caplog) -> None:
    import logging

    from dolphin_train.model.tokenizer import load_tokenizer

    with caplog.at_level(logging.INFO, logger="dolphin_train"):
        tok = load_tokenizer(validate_mapping(tiny_config(tmp_path, tokenizer_use_fast=False)))
    assert tok.tokenizer.is_fast and "tokenizer_use_fast: false: using the fast tokenizer" in caplog.text


def test_sdp_attention_says_why_sdpa_was_chosen() -> None:
    from dolphin_train.config.resolve import resolve_runtime

    cfg = validate_mapping({"base_model": "m", "datasets": [{"path": "d.jsonl"}], "sdp_attention": True})
    runtime = resolve_runtime(cfg)
    assert runtime.attn_implementation == "sdpa" and "sdp_attention: true" in runtime.attention_note


def test_sequence_len_past_the_models_positions_is_refused_unless_rope_is_scaled(tmp_path: Path) -> None:
    import json

    from dolphin_train.errors import ConfigError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    raw = {"base_model": str(model), "datasets": [{"path": "d.jsonl"}]}
    with pytest.raises(ConfigError) as caught:
        validate_mapping({**raw, "sequence_len": 4096})
    assert "sequence_len: 4096" in str(caught.value) and "max_position_embeddings (2048" in str(caught.value)
    validate_mapping({**raw, "sequence_len": 2048})
    scaled = {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    validate_mapping({**raw, "sequence_len": 4096, "model_config": scaled})
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 2048, **scaled}))
    validate_mapping({**raw, "sequence_len": 4096})
