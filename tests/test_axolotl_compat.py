"""Coming from axolotl: configs written the way axolotl's examples write them load, mean what they say, and
prepare their data; keys we do not carry say so and name what to use instead.

The table below holds axolotl-style configs (written here, after the shapes of axolotl's example configs)
that together use every chat template and every axolotl key dolphin-train accepts. Each is validated and
its data prepared with the repository's tiny tokenizer (a template's markers are added to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, sharegpt, write_config, write_jsonl
from dolphin_train.config.load import load_config, validate_mapping
from dolphin_train.config.schema import CCE_PLUGIN, LIGER_PLUGIN, TEMPLATE_NAMES, DatasetConfig
from dolphin_train.data.formats import RowConverter
from dolphin_train.data.prepare import prepare_data
from dolphin_train.errors import ConfigError, DolphinError
from dolphin_train.model.tokenizer import load_tokenizer

MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i}+1?"},
                  {"role": "assistant", "content": f"{i + 1}."}, {"role": "user", "content": "And plus two?"},
                  {"role": "assistant", "content": f"{i + 2}."}]}
    for i in range(6)
]  # fmt: skip
NO_SYSTEM = [{"messages": m["messages"][1:]} for m in MESSAGES]
TOOLS = [{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Checking."},
                       {"role": "tool", "content": '{"sky": "clear"}'}, {"role": "assistant", "content": "Sunny."}]}
         ] * 3  # fmt: skip
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"{i}?"},
                               {"from": "gpt", "value": f"{i}!"}]} for i in range(6)]  # fmt: skip
ALPACA = [{"instruction": f"Add one to {i}.", "input": "", "output": str(i + 1)} for i in range(6)]

# Keys axolotl configs carry empty ("not set"): known keys, so empty means the default.
EMPTY = ("wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "resume_from_checkpoint",
         "lora_model_dir", "evals_per_epoch", "special_tokens", "push_dataset_to_hub", "torchdistx_path",
         "gptq_groupsize", "gptq_model_v1", "max_packed_sequence_len", "eval_table_size", "local_rank",
         "xformers_attention")  # fmt: skip
EMPTY_KEYS = dict.fromkeys(EMPTY)

# (name, rows, config keys): every template and every accepted axolotl key appears at least once.
TABLE: list[tuple[str, list, dict[str, Any]]] = [
    ("llama3 instruct LoRA", MESSAGES + TOOLS, {
        "chat_template": "llama3", "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
        "lora_target_modules": ["q_proj", "v_proj"], "loss_watchdog_threshold": 5.0, "loss_watchdog_patience": 3,
        "attn_implementation": "flash_attention_2", "is_llama_derived_model": True, "eval_batch_size": 2,
        "lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True,
        "datasets": [{"type": "chat_template", "field_messages": "messages",
                      "message_property_mappings": {"role": "role", "content": "content"}}], **EMPTY_KEYS}),
    ("llama3_2, eot_tokens", MESSAGES + TOOLS, {"chat_template": "llama3_2", "eot_tokens": ["<|eot_id|>"]}),
    ("llama4", MESSAGES + TOOLS, {"chat_template": "llama4", "gradient_checkpointing": True,
                                  "gradient_checkpointing_kwargs": {"use_reentrant": False}}),
    ("OpenTelemetry metrics, use_wandb", MESSAGES, {"chat_template": "chatml", "use_otel_metrics": True,
                                                   "otel_metrics_host": "localhost",
                                                   "otel_metrics_port": 8000, "use_wandb": False}),
    ("gemma QLoRA", NO_SYSTEM, {"chat_template": "gemma", "adapter": "qlora", "load_in_4bit": True,
                                "eot_tokens": ["<end_of_turn>"], "attention": "sdpa",
                                "lora_target_modules": "model.layers.[0-9]+.self_attn.(q|v)_proj"}),
    ("gemma3, unfrozen parameters", MESSAGES, {"chat_template": "gemma3", "eot_tokens": ["<end_of_turn>"],
                                               "unfrozen_parameters": ["^lm_head.weight$", "model.layers.1.*"]}),
    ("gemma3n LoRA", MESSAGES, {"chat_template": "gemma3n", "adapter": "lora", "lora_target_modules":
                                "model.layers.[\\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"}),
    ("gemma4 31B QLoRA", MESSAGES, {"chat_template": "gemma4", "eot_tokens": ["<turn|>"], "adapter": "qlora",
                                    "load_in_4bit": True, "bnb_config_kwargs": {"bnb_4bit_use_double_quant": True},
                                    "gemma4_hybrid_attn_impl": True, "attn_implementation": "flash_attention_2",
                                    "plugins": [LIGER_PLUGIN], "liger_rms_norm_gated": True}),
    ("gemma4 unified LoRA", MESSAGES, {"chat_template": "gemma4_unified", "eot_tokens": ["<turn|>"],
                                       "adapter": "lora", "gemma4_hybrid_attn_impl": True}),
    ("phi-3 alpaca:phi", ALPACA, {"chat_template": "phi_3", "resize_token_embeddings_to_32x": True,
                                  "eval_table_size": 0, "eval_max_new_tokens": 128, "eval_table_max_new_tokens": 64,
                                  "datasets": [{"type": "alpaca:phi"}], "bfloat16": True, "bf16": "auto"}),
    ("phi-3.5 alpaca:chat", ALPACA, {"chat_template": "phi_35", "datasets": [{"type": "alpaca:chat"}]}),
    ("qwen2.5, Liger", MESSAGES + TOOLS, {
        "chat_template": "qwen_25", "plugins": [LIGER_PLUGIN], "liger_rope": True, "liger_rms_norm": True,
        "liger_glu_activation": True, "liger_layer_norm": True, "liger_fused_linear_cross_entropy": True,
        "liger_cross_entropy": False, "liger_kernel": True, "is_qwen_derived_model": True}),
    ("qwen3, CutCrossEntropy, 4-bit AdamW, fused attention", MESSAGES + TOOLS, {
        "chat_template": "qwen3", "plugins": [CCE_PLUGIN], "cut_cross_entropy": True, "fused_attn_kernel": True,
        "torch_compile": True, "torch_compile_mode": "max-autotune",
        "optimizer": "adamw_torch_4bit", "ddp_find_unused_parameters": True}),
    ("deepseek-v2, old field names", SHAREGPT, {
        "chat_template": "deepseek_v2", "datasets": [{
            "type": "chat_template", "field_messages": "conversations", "message_field_role": "from",
            "message_field_content": "value"}]}),
    ("mistral v1", MESSAGES, {"chat_template": "mistral_v1", "is_mistral_derived_model": True,
                              "auto_resume_from_checkpoints": True, "attention": "eager"}),
    ("mistral v3 tekken", MESSAGES, {"chat_template": "mistral_v3_tekken", "attn_implementation": "sdp",
                                     "adapter": "lora", "lora_fan_in_fan_out": False, "low_cpu_mem_usage": True}),
    ("mistral v7 tekken", MESSAGES, {"chat_template": "mistral_v7_tekken", "attention": "flash"}),
    ("command-r", MESSAGES, {"chat_template": "cohere", "gptq": False, "flash_attn_fuse_mlp": False,
                             "flash_attn_cross_entropy": False, "flash_attn_rms_norm": False,
                             "flash_attn_fuse_qkv": False, "lora_mlp_kernel": False, "lora_qkv_kernel": False,
                             "lora_o_kernel": False, "do_causal_lm_eval": False, "float16": False,
                             "flash_optimum": False}),
    ("falcon-h1", MESSAGES + TOOLS, {"chat_template": "falcon_h1", "is_falcon_derived_model": True,
                                     "attention": "flex"}),
    ("falcon alpaca:chat, xformers", ALPACA, {"attn_implementation": "xformers", "xformers_attention": True,
                                             "datasets": [{"type": "alpaca:chat"}]}),
    ("openllama alpaca, float16 weights", ALPACA, {"float16": True, "bf16": False, "fp16": False,
                                                   "datasets": [{"type": "alpaca"}]}),
    ("llama-2 LISA, old fusions", ALPACA, {"lisa_n_layers": 2, "lisa_step_interval": 20, "flash_attn_fuse_mlp": True,
                                           "lisa_layers_attribute": "model.layers", "flash_attn_rms_norm": True,
                                           "datasets": [{"type": "alpaca"}]}),
    ("llama-3 deduplicated", MESSAGES, {"chat_template": "llama3", "dataset_exact_deduplication": True}),
    ("falcon qlora, early stopping", ALPACA, {"early_stopping_patience": 3, "val_set_size": 0.2, "batch_size": 2,
                                              "micro_batch_size": 1, "datasets": [{"type": "alpaca"}]}),
    ("tokenizer default, fallback", MESSAGES, {"chat_template": "tokenizer_default_fallback_chatml"}),
    ("dolphin sharegpt chatml", SHAREGPT, {"datasets": [{"type": "sharegpt", "conversation": "chatml"}],
                                           "chat_template": "chatml"}),
]  # fmt: skip


def _raw(tmp_path: Path, rows: list, keys: dict[str, Any]) -> dict[str, Any]:
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    keys = dict(keys)
    datasets = [{"path": str(data), "type": "chat_template", **d} for d in keys.pop("datasets", [{}])]
    return {"base_model": str(REPO / "configs/tiny/model"), "tokenizer_config": str(REPO / "configs/tiny/tokenizer"),
            "datasets": datasets, "dataset_prepared_path": str(tmp_path / "prepared"),
            "output_dir": str(tmp_path / "out"), "sequence_len": 512, **keys}  # fmt: skip


def test_the_table_uses_every_template() -> None:
    used = {keys.get("chat_template") for _, _, keys in TABLE}
    assert set(TEMPLATE_NAMES) <= used


@pytest.mark.parametrize(("name", "rows", "keys"), TABLE, ids=[t[0] for t in TABLE])
def test_axolotl_style_config_validates_and_prepares(name: str, rows: list, keys: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yml", _raw(tmp_path, rows, keys))
    cfg = load_config(path)
    loaded = load_tokenizer(cfg)
    prepared = prepare_data(cfg, loaded.tokenizer)
    assert prepared.report.kept == len(rows) and prepared.report.trainable_tokens > 0


# ---- keys that are refused, and unknown keys ----------------------------------------------------------------


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_mapping(raw)
    return info.value.problems


BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}


def test_an_unknown_key_is_refused_even_when_empty() -> None:
    """axolotl configs write `key:` for "not set"; an unknown key written so used to pass unnoticed."""
    assert _problems({**BASE, "eval_tabel_size": None}) == ["eval_tabel_size: unknown key (did you mean "
                                                            "`eval_table_size`?)"]  # fmt: skip
    assert _problems({**BASE, "datasets": [{"path": "d.jsonl", "shards": None}]}) == ["datasets[0].shards: unknown key"]
    assert _problems({**BASE, "special_tokens": {"sep_token": None}}) == [
        "special_tokens.sep_token: unknown key (did you mean `pad_token`?)"
    ]
    cfg = validate_mapping({**BASE, "eval_table_size": None, "special_tokens": None, "wandb_project": None})
    assert cfg.eval_table_size is None and cfg.wandb_project is None


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"gptq": True}, "gptq: True is not supported; instead: load_in_4bit: true with adapter: qlora"),
        ({"flash_attn_fuse_mlp": True, "liger_glu_activation": False}, "flash_attn_fuse_mlp: true asks for Liger's "
                                                                        "fused kernel, but liger_glu_activation is"),
        ({"flash_attn_rms_norm": True, "liger_kernel": False}, "liger_kernel: false, but the LigerPlugin or liger_*"),
        ({"flash_attn_fuse_qkv": True}, "flash_attn_fuse_qkv: True is not supported; instead: flash_attention"),
        ({"flash_attn_cross_entropy": True}, "is not supported; instead: chunked_cross_entropy: true"),
        ({"lora_qkv_kernel": True}, "lora_qkv_kernel: fuses LoRA projections; set adapter: lora or qlora"),
        ({"do_causal_lm_eval": True}, "do_causal_lm_eval generates from the evaluation set: set val_set_size"),
        ({"float16": True, "fp16": True}, "float16 weights compute in float16 without mixed precision: remove"),
        ({"float16": True, "bfloat16": True}, "float16 weights compute in float16 without mixed precision: remove"),
        ({"eval_table_size": 5, "eval_max_new_tokens": 32}, "eval_table_size generates from the evaluation set: "
                                                           "set val_set_size"),
        ({"plugins": ["axolotl.integrations.kernels.KernelsPlugin"]}, "KernelsPlugin: not supported. dolphin-train "
                                                                      "has no plugin system"),
        ({"attn_implementation": "sage"}, "not supported; instead: flash_attention: true"),
        ({"xformers_attention": True, "flash_attention": True}, "xformers_attention with another attention backend"),
        ({"chat_template": "qwen3_5"}, "unknown chat template"),
        ({"unfrozen_parameters": ["^model.embed_tokens.weight$[:32000]"]}, "row ranges of a parameter are not "
                                                                           "supported"),
        ({"liger_kernel": False, "liger_rope": True}, "liger_kernel: false, but the LigerPlugin or liger_* keys"),
        ({"attention": "flash", "attn_implementation": "eager"}, "attention and attn_implementation disagree"),
        ({"lisa_step_interval": 5}, "lisa_step_interval: no effect without lisa_n_layers"),
        ({"lisa_n_layers": 2, "adapter": "lora"}, "lisa_n_layers trains a changing set of whole layers: it cannot be "
                                                  "combined with adapter"),
        ({"fused_attn_kernel": True, "liger_rope": False}, "fused_attn_kernel: true asks for Liger's fused kernel, "
                                                           "but liger_rope is false"),
        ({"torch_compile_mode": "max-autotune"}, "torch_compile_mode applies to layers compiled with the inductor"),
        ({"torch_compile": True, "torch_compile_backend": "aot_eager", "torch_compile_mode": "max-autotune"},
         "torch_compile_mode applies to layers compiled with the inductor"),
        ({"peft": {"loftq_config": {"loftq_bits": 4}}, "adapter": "qlora", "load_in_4bit": True},
         "peft.loftq_config: LoftQ quantises the base itself"),
        ({"low_cpu_mem_usage": False}, "low_cpu_mem_usage"),
        ({"early_stopping_patience": 3}, "early_stopping_patience watches the evaluation loss: set val_set_size"),
        ({"batch_size": 3, "micro_batch_size": 2}, "batch_size: 3 is not micro_batch_size x gradient_accumulation"),
        ({"batch_size": 4, "micro_batch_size": 1, "gradient_accumulation_steps": 2}, "batch_size: 4 is not"),
    ],
)  # fmt: skip
def test_refused_keys_say_so_and_name_the_alternative(keys: dict, says: str) -> None:
    problems = _problems({**BASE, **keys})
    assert any(says in p for p in problems), problems


def test_eot_tokens_with_chatml_must_be_its_own() -> None:
    assert "eot_tokens: chatml ends every turn with <|im_end|>" in _problems({**BASE, "eot_tokens": ["</s>"]})[0]
    assert validate_mapping({**BASE, "eot_tokens": ["<|im_end|>"]}).eot_tokens == ["<|im_end|>"]


# ---- what accepted keys do ----------------------------------------------------------------------------------


def test_exact_duplicates_are_dropped_before_the_split_and_counted(tmp_path: Path) -> None:
    """Rows that tokenize the same (here: the same conversation from two files) are kept once; a row that
    differs in one token is kept."""
    changed = {"messages": [*MESSAGES[0]["messages"][:2], {"role": "assistant", "content": "2!"}]}
    rows = [*MESSAGES, *MESSAGES[:4], changed]
    raw = _raw(tmp_path, rows, {"chat_template": "chatml", "dataset_exact_deduplication": True, "val_set_size": 2})
    cfg = load_config(write_config(tmp_path / "config.yml", raw))
    tokenizer = load_tokenizer(cfg).tokenizer
    prepared = prepare_data(cfg, tokenizer)
    assert prepared.report.dropped_duplicates == 4 and prepared.report.kept == len(MESSAGES) + 1
    rows_seen = [tuple(r) for r in prepared.train["input_ids"]] + [tuple(r) for r in prepared.eval["input_ids"]]
    assert len(rows_seen) == len(set(rows_seen)) == len(MESSAGES) + 1  # no evaluation row repeats a training row
    plain = prepare_data(load_config(write_config(tmp_path / "plain.yml", {**raw, "dataset_exact_deduplication":
                                                                           False})), tokenizer)  # fmt: skip
    assert plain.report.dropped_duplicates == 0 and plain.report.kept == len(rows)


def test_message_field_aliases_read_the_turns() -> None:
    ds = DatasetConfig(path="-", type="chat_template", field_messages="c", message_field_role="from",
                       message_field_content="value")  # fmt: skip
    row = {"c": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    assert RowConverter(ds, None, False)(row)["contents"] == ["Hi", "Hello."]
    with pytest.raises(ValueError, match=r"message_field_role: 'from' and message_property_mappings\.role"):
        DatasetConfig(path="-", message_field_role="from", message_property_mappings={"role": "speaker"})


def test_alpaca_variants_read_alpaca_rows() -> None:
    row = {"instruction": "Add one to 1.", "input": "", "output": "2", "system": "Be brief."}
    rows = [RowConverter(DatasetConfig(path="-", type=t), None, False)(row) for t in ("alpaca", "alpaca:chat",
                                                                                         "alpaca:phi")]  # fmt: skip
    assert rows[0] == rows[1] == rows[2]


def test_attention_names_choose_the_backend() -> None:
    from dolphin_train.config.machine import Machine
    from dolphin_train.config.resolve import XFORMERS_NOTE, resolve_attention

    def backend(**keys) -> tuple[str, str]:
        return resolve_attention(validate_mapping({**BASE, **keys}), Machine.planned("cpu", 1))

    assert backend(attention="eager") == ("eager", "set by attention")
    assert backend(attention="flex") == ("flex_attention", "set by attention")
    assert backend(attn_implementation="sdp") == ("sdpa", "set by attn_implementation")
    assert backend(attn_implementation="xformers") == backend(xformers_attention=True) == ("sdpa", XFORMERS_NOTE)
    assert backend(attention="xformers")[0] == "sdpa"
    assert backend(attention="flash")[0] == "dolphin_sdpa_varlen"  # the flash path: SDPA as its kernel without CUDA
    assert "flash_attention: true, but no CUDA device" in backend(attention="flash")[1]


def test_liger_keys_become_transformers_kernel_choice_and_cce_the_chunked_loss() -> None:
    from dolphin_train.config.resolve import RuntimeSettings
    from dolphin_train.train.arguments import use_liger
    from dolphin_train.train.loss import use_chunked_cross_entropy

    cfg = validate_mapping({**BASE, "plugins": [LIGER_PLUGIN, CCE_PLUGIN], "liger_rope": True,
                            "liger_glu_activation": True, "liger_fused_linear_cross_entropy": False})  # fmt: skip
    assert cfg.liger_kernel_config == {"rope": True, "swiglu": True, "geglu": True, "fused_linear_cross_entropy": False}
    old = validate_mapping({**BASE, "flash_attn_fuse_mlp": True, "flash_attn_rms_norm": True})  # axolotl's old path
    assert old.liger_kernel_config == {"rms_norm": True, "swiglu": True, "geglu": True}
    fused = validate_mapping({**BASE, "fused_attn_kernel": True})
    assert fused.liger_kernel_config == {"rope": True, "rms_norm": True}
    cpu = RuntimeSettings("cpu", False, False, False, "sdpa", "", 1, "single process", liger=False)
    gpu = RuntimeSettings("cuda", True, False, True, "sdpa", "", 1, "single process", liger=True)
    assert not use_liger(cfg, cpu) and use_liger(cfg, gpu)  # on CUDA, with liger-kernel installed
    assert not use_liger(validate_mapping({**BASE, "liger_kernel": False}), gpu)
    assert use_chunked_cross_entropy(cfg, vocab_size=1000)  # the CCE plugin asks for it even for small vocabularies
    off = validate_mapping({**BASE, "plugins": [CCE_PLUGIN], "cut_cross_entropy": False})
    assert not use_chunked_cross_entropy(off, vocab_size=1000)


def test_training_arguments_carry_ddp_and_eval_batch_keys(tmp_path: Path) -> None:
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.train.arguments import build_training_arguments
    from dolphin_train.train.schedule import compute_schedule

    raw = _raw(tmp_path, SHAREGPT, {"ddp_find_unused_parameters": True, "eval_batch_size": 3, "micro_batch_size": 2,
                                    "bf16": False, "datasets": [{"type": "sharegpt"}]})  # fmt: skip
    cfg = validate_mapping(raw)
    args = build_training_arguments(cfg, resolve_runtime(cfg), compute_schedule(cfg, 10, 1, has_eval=False))
    assert args.ddp_find_unused_parameters is True
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (2, 3)


def test_auto_resume_from_checkpoints_finds_the_latest(tmp_path: Path) -> None:
    from dolphin_train.train.control import resolve_resume

    cfg = validate_mapping({**BASE, "output_dir": str(tmp_path), "auto_resume_from_checkpoints": True})
    assert resolve_resume(cfg) is None  # nothing yet: start fresh
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    (tmp_path / "checkpoint-3" / "rng_state.pth").write_bytes(b"")  # a full checkpoint, not weights only
    assert resolve_resume(cfg) == str(tmp_path / "checkpoint-3")
    assert resolve_resume(validate_mapping({**BASE, "output_dir": str(tmp_path)})) is None


def test_declared_model_family_is_checked_against_the_model() -> None:
    from transformers import LlamaConfig

    from dolphin_train.model.load import check_declared_family

    assert check_declared_family(validate_mapping({**BASE, "is_llama_derived_model": True}), LlamaConfig()) == []
    wrong = check_declared_family(validate_mapping({**BASE, "is_mistral_derived_model": True}), LlamaConfig())
    assert wrong == ["is_mistral_derived_model: True but the model type is 'llama'"]


def _tiny_model(tmp_path: Path, **keys):
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import load_model

    raw = _raw(tmp_path, SHAREGPT, {"train_from_scratch": True, "bf16": False, "datasets": [{"type": "sharegpt"}],
                                    **keys})  # fmt: skip
    cfg = validate_mapping(raw)
    return cfg, load_model(cfg, resolve_runtime(cfg), load_tokenizer(cfg))


def _planned_trainable(cfg) -> int:
    from dolphin_train.plan.report import make_plan

    return make_plan(cfg, gpus=1, gpu_memory=2**34, device="cpu").memory.params.trainable


def test_unfrozen_parameters_train_only_what_they_name_in_training_and_in_the_plan(tmp_path: Path) -> None:
    patterns = ["^lm_head.weight$", "model.layers.1.mlp"]
    cfg, model = _tiny_model(tmp_path, unfrozen_parameters=patterns)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"lm_head.weight", *(f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down"))}
    assert _planned_trainable(cfg) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(DolphinError, match="match no trainable parameter"):
        _tiny_model(tmp_path / "none", unfrozen_parameters=["^nothing$"])


def test_unfrozen_parameters_with_an_adapter_keep_only_matching_adapter_weights(tmp_path: Path) -> None:
    cfg, model = _tiny_model(tmp_path, adapter="lora", unfrozen_parameters=["model.layers.0."])
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".layers.0." in n and "lora_" in n for n in trained)
    assert _planned_trainable(cfg) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_regular_expression_picks_the_lora_modules(tmp_path: Path) -> None:
    _, model = _tiny_model(tmp_path, adapter="lora", lora_target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {f"base_model.model.model.layers.0.self_attn.{m}_proj" for m in ("q", "v")}
    assert validate_mapping({**BASE, "adapter": "lora", "lora_target_modules": "(lm_head|.*q_proj)"}).adapts_output_head


def test_lora_fan_in_fan_out_reaches_peft(tmp_path: Path) -> None:
    """peft sets it from each layer's type: true on Llama's Linear layers is corrected, with peft's warning."""
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        _, model = _tiny_model(tmp_path, adapter="lora", lora_fan_in_fan_out=True)
    assert model.peft_config["default"].fan_in_fan_out is False


def test_embeddings_grow_to_a_multiple_of_32_when_asked(tmp_path: Path) -> None:
    from dolphin_train.plan.report import model_facts

    tokens = ["<|im_start|>", "<|im_end|>", "<extra_1>", "<extra_2>", "<extra_3>"]
    cfg, model = _tiny_model(tmp_path, tokens=tokens, resize_token_embeddings_to_32x=True)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 32 == 0 and rows >= len(load_tokenizer(cfg).tokenizer)
    assert model_facts(cfg).vocab_rows == rows
    plain, model = _tiny_model(tmp_path / "plain", tokens=tokens)
    assert model.get_input_embeddings().weight.shape[0] == len(load_tokenizer(plain).tokenizer)


def test_bfloat16_keeps_the_weights_in_bfloat16(tmp_path: Path) -> None:
    import torch

    cfg, model = _tiny_model(tmp_path, bfloat16=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    from dolphin_train.plan.report import make_plan

    plan = make_plan(cfg, gpus=1, gpu_memory=2**34, device="cpu")
    assert plan.memory.params.weight_bytes == sum(p.numel() * 2 for p in model.parameters())


def test_torch_compile_mode_reaches_the_compiled_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.load import compile_layers

    cfg, model = _tiny_model(tmp_path, torch_compile=True, torch_compile_mode="max-autotune")
    seen: list[dict] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))  # a spy, not a compile
    assert compile_layers(model, cfg, resolve_runtime(cfg)) == 4
    assert seen and all(kw["mode"] == "max-autotune" and kw["backend"] == "inductor" for kw in seen)


def test_float16_keeps_weights_and_arithmetic_in_float16(tmp_path: Path) -> None:
    import torch

    from dolphin_train.config.machine import Machine
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.plan.report import make_plan

    cfg, model = _tiny_model(tmp_path, float16=True, bf16="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    runtime = resolve_runtime(cfg, Machine.planned("cuda", 1))
    assert (runtime.bf16, runtime.fp16) == (False, False)  # bf16: auto gives way; no autocast, no loss scaler
    plan = make_plan(cfg, gpus=1, gpu_memory=2**34, device="cpu")
    assert plan.memory.params.weight_bytes == sum(p.numel() * 2 for p in model.parameters())
    assert plan.memory.precision == "fp16"
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float16 and torch.isfinite(model.lm_head.weight.grad).all()


@pytest.mark.parametrize(
    ("name", "torchao_class"), [("adamw_torch_4bit", "AdamW4bit"), ("adamw_torch_8bit", "AdamW8bit")]
)
def test_torchao_low_bit_adamw_steps_on_the_cpu(name: str, torchao_class: str, tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    import torch
    from transformers import Trainer, TrainingArguments

    _, model = _tiny_model(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), optim=name, use_cpu=True, report_to="none")
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer).__name__ == torchao_class
    before = model.lm_head.weight.detach().clone()
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.lm_head.weight)


def _training_arguments(cfg):
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.train.arguments import build_training_arguments
    from dolphin_train.train.schedule import compute_schedule

    cfg = cfg.model_copy(update={"bf16": False, "output_dir": "unused"})
    return build_training_arguments(cfg, resolve_runtime(cfg), compute_schedule(cfg, 10, 1, has_eval=False))


def test_fsdp_version_with_fsdp_config_turns_fsdp_on_as_axolotl_reads_it() -> None:
    from dolphin_train.train.arguments import fsdp_options, fsdp_settings

    config = {"offload_params": True, "cpu_ram_efficient_loading": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "state_dict_type": "FULL_STATE_DICT",
              "sharding_strategy": "FULL_SHARD", "reshard_after_forward": True,
              "activation_checkpointing": True}  # fmt: skip
    cfg = validate_mapping({**BASE, "fsdp_version": 2, "fsdp_config": config})
    assert fsdp_options(cfg) == ["full_shard", "auto_wrap", "offload"]
    settings = fsdp_settings(cfg)
    assert settings is not None and settings["version"] == 2
    assert "offload_params" not in settings and "sharding_strategy" not in settings  # now options transformers reads
    assert settings["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer" and settings["activation_checkpointing"]
    grads_only = validate_mapping({**BASE, "fsdp_version": 2, "fsdp_config": {"reshard_after_forward": False}})
    assert fsdp_options(grads_only) == ["shard_grad_op", "auto_wrap"]
    plugin = [_training_arguments(c).fsdp_plugin_args for c in (cfg, grads_only)]  # what accelerate gets
    assert plugin[0]["cpu_offload"] is True and plugin[0]["reshard_after_forward"] is True
    assert "cpu_offload" not in plugin[1] and plugin[1]["reshard_after_forward"] is False
    old = validate_mapping({**BASE, "fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_offload_params": True}})
    assert fsdp_options(old) == ["full_shard", "auto_wrap", "offload"]  # the older spelling's key, no longer unread
    same = validate_mapping({**BASE, "fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_state_dict_type": "X"}})
    assert same.fsdp == "full_shard auto_wrap" and same.fsdp_config == {"fsdp_state_dict_type": "X"}  # untouched
    assert "fsdp_version: no effect without fsdp_config" in _problems({**BASE, "fsdp_version": 2})[0]
    clash = {**BASE, "fsdp": ["shard_grad_op"], "fsdp_config": {"sharding_strategy": "FULL_SHARD"}}
    assert "sharding_strategy (full_shard) and fsdp (shard_grad_op) disagree" in _problems(clash)[0]


def test_batch_size_without_accumulation_steps_sets_them_as_axolotl_does() -> None:
    assert validate_mapping({**BASE, "batch_size": 8, "micro_batch_size": 2}).gradient_accumulation_steps == 4
    assert validate_mapping({**BASE, "batch_size": 2}).gradient_accumulation_steps == 2  # micro_batch_size 1
    auto = validate_mapping({**BASE, "batch_size": 8, "micro_batch_size": "auto"})
    assert auto.gradient_accumulation_steps == 1  # decided with the micro-batch, by the plan


def test_early_stopping_counts_evaluations_without_a_new_best() -> None:
    from types import SimpleNamespace

    from dolphin_train.train.control import EarlyStopping

    early, control = EarlyStopping(patience=2), SimpleNamespace(should_training_stop=False)
    for step, loss in enumerate([3.0, 2.0, 2.5, 1.5, 1.6], start=1):
        early.on_evaluate(None, SimpleNamespace(global_step=step), control, metrics={"eval_loss": loss})
        assert not control.should_training_stop, step  # the new best at step 4 reset the count
    early.on_evaluate(None, SimpleNamespace(global_step=6), control, metrics={"eval_loss": 1.5})  # equal: no better
    assert control.should_training_stop and (early.stopped_step, early.best_step, early.best) == (6, 4, 1.5)


def test_lisa_trains_the_drawn_layers_and_always_the_rest(tmp_path: Path) -> None:
    """Each step changes exactly the drawn decoder layers plus the embeddings, norm and head; the draw changes
    every `lisa_step_interval` steps and depends only on the seed and the step (a resumed run draws the same)."""
    from types import SimpleNamespace

    import torch

    from dolphin_train.train.lisa import LayerwiseSampling

    cfg, model = _tiny_model(tmp_path, lisa_n_layers=1, lisa_step_interval=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # made first, as the Trainer does
    lisa, control = LayerwiseSampling.from_config(cfg, model), SimpleNamespace()
    layers = model.model.layers
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    lisa.on_train_begin(None, SimpleNamespace(global_step=0), control)
    drawn = []
    for step in range(6):
        lisa.on_step_begin(None, SimpleNamespace(global_step=step), control)
        before = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
        head = model.lm_head.weight.detach().clone()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = [list(layer.parameters()) for layer in layers]
        changed = [i for i in range(len(layers)) if not all(map(torch.equal, before[i], after[i]))]
        assert changed == lisa.active and len(changed) == 1, (step, changed)
        assert not torch.equal(head, model.lm_head.weight)
        drawn.append(changed[0])
    assert drawn[0::2] == drawn[1::2]  # the same layer for both steps of an interval
    assert len(set(drawn)) > 1  # and new draws
    assert LayerwiseSampling(layers, 1, 2, cfg.seed).draw(5) == [drawn[5]]  # a resumed run draws the same
    with pytest.raises(ConfigError, match="lisa_n_layers: 5 is more than the model's 4 layers"):
        LayerwiseSampling(layers, 5, 2, 0)


@pytest.mark.slow
def test_a_lisa_run_trains_the_drawn_layers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import tiny_config
    from dolphin_train.cli import main

    rows = [sharegpt(("human", f"{i}?"), ("gpt", f"{i}!")) for i in range(8)]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_steps=2, save_steps=1000,
                      lisa_n_layers=1, lisa_step_interval=5)  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", raw))]) == 0
    assert "LISA: 1 of 4 layers trained at a time, drawn every 5 steps" in " ".join(capsys.readouterr().out.split())
    assert (tmp_path / "out/model.safetensors").exists()


@pytest.mark.slow
def test_early_stopping_stops_a_run_whose_evaluation_loss_stays_put(tmp_path: Path, capsys: pytest.CaptureFixture):
    """A learning rate of 0.5 moves every weight by about 0.5 at the first step (Adam), which wrecks the
    model: with patience 1 the evaluation after that step is worse than the one before training and stops
    the run. (A tiny learning rate does not keep the loss exactly still: weights near zero still move.)"""
    import json

    from conftest import tiny_config
    from dolphin_train.cli import main

    rows = [sharegpt(("human", f"{i}?"), ("gpt", f"{i}!")) for i in range(16)]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_steps=20, save_steps=1000,
                      learning_rate=0.5, val_set_size=4, eval_steps=1, early_stopping_patience=1)  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", raw))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    said = "Stopped early at step 1: the evaluation loss has not improved in 1 evaluation(s); its best, 7.739, was at"
    assert f"{said} step 0" in out, out[-600:]
    assert json.loads((tmp_path / "out/run_summary.json").read_text())["steps"] == 1


def test_loss_watchdog_stops_after_patience_high_losses_in_a_row() -> None:
    from types import SimpleNamespace

    from dolphin_train.train.control import LossWatchdog

    watchdog, control = LossWatchdog(threshold=5.0, patience=3), SimpleNamespace(should_training_stop=False)
    for step, loss in enumerate([9.0, 9.0, 1.0, 9.0, 9.0], start=1):
        watchdog.on_log(None, SimpleNamespace(global_step=step), control, logs={"loss": loss})
    assert watchdog.bad_step is None and not control.should_training_stop  # the low loss reset the count
    watchdog.on_log(None, SimpleNamespace(global_step=6), control, logs={"loss": 9.0})
    assert watchdog.bad_step == 6 and control.should_training_stop


@pytest.mark.slow
def test_loss_watchdog_stops_a_run_naming_the_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import tiny_config
    from dolphin_train.cli import main

    rows = [sharegpt(("human", f"{i}?"), ("gpt", f"{i}!")) for i in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    raw = tiny_config(tmp_path, data, max_steps=20, save_steps=1000, loss_watchdog_threshold=0.5,
                      loss_watchdog_patience=2)  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", raw))]) == 1
    err = capsys.readouterr().err
    assert "stayed above loss_watchdog_threshold (0.5) for 2 logged steps, up to step 2" in err


def test_liger_fused_loss_gives_way_to_the_chunked_loss_when_the_head_has_trained_rows() -> None:
    """Liger's fused head + loss reads the head's own weight, without the trained rows of added tokens."""
    from dolphin_train.config.resolve import RuntimeSettings
    from dolphin_train.train.arguments import liger_fuses_loss, liger_settings

    cfg = validate_mapping({**BASE, "liger_rms_norm": True})
    gpu = RuntimeSettings("cuda", True, False, True, "sdpa", "", 1, "single process", liger=True)
    cpu = RuntimeSettings("cpu", False, False, False, "sdpa", "", 1, "single process", liger=False)
    assert liger_settings(cfg, cpu) is None and not liger_fuses_loss(None)
    assert liger_settings(cfg, gpu) == {"rms_norm": True} and liger_fuses_loss(liger_settings(cfg, gpu))
    with_rows = liger_settings(cfg, gpu, head_has_token_rows=True)
    assert with_rows == {"rms_norm": True, "fused_linear_cross_entropy": False} and not liger_fuses_loss(with_rows)


def test_debug_prints_the_first_training_row_with_its_trained_tokens(tmp_path: Path, capsys) -> None:
    """axolotl's `debug: true` label check: the first prepared row, token by token with ids, before training."""
    from conftest import tiny_config
    from dolphin_train.cli import main

    rows = [sharegpt(("human", f"{i}?"), ("gpt", f"{i}!")) for i in range(4)]
    for debug in (True, False):
        raw = tiny_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_steps=1, debug=debug)
        assert main([str(write_config(tmp_path / "c.yml", raw))]) == 0
        out = capsys.readouterr().out
        assert ("example 0 (" in out and "<|im_start|>(" in out) is debug, out[-2000:]
