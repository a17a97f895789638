"""The config schema: the one place where every key is named, typed, defaulted and documented.

Key names follow axolotl so that existing configs (the Dolphin recipes among them) load unchanged.
Each field's description is its documentation: the README's config reference is generated from it
(`scripts/gen_config_reference.py`, checked by a test).

A field marked `unsupported` is known (so a config using it gets a precise message instead of "unknown
key"), but setting it to anything other than its default fails with "not supported yet".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SECTIONS = ("model", "data", "training", "distributed", "logging")

# Optimizers by their transformers names. A curated list (rather than transformers' own enum) keeps
# config validation free of a torch import; a test checks every name against transformers.
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
    "adagrad",
    "rmsprop",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_8bit",
    "paged_lion_32bit",
    "ademamix",
    "ademamix_8bit",
    "schedule_free_adamw",
)

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


def key(default: Any = None, doc: str = "", section: str = "training", unsupported: bool = False, **kw: Any):
    """A documented config key. `section` groups it in the reference; `unsupported` marks planned keys."""
    extra = {"section": section}
    if unsupported:
        extra["unsupported"] = True
    return Field(default, description=doc, json_schema_extra=extra, **kw)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), populate_by_name=True)


class DatasetConfig(_Strict):
    """One entry of `datasets:`."""

    path: str = key(
        ...,
        "A local file (`.jsonl`, `.json`, `.parquet`, `.csv`, `.arrow`), a directory or glob of such files, or a "
        "Hugging Face hub dataset id (loaded with `datasets.load_dataset`).",
        "data",
    )
    type: Literal["sharegpt", "chat_template", "alpaca", "completion"] = key(
        "sharegpt",
        "Row format. `sharegpt`: a `conversations` list of `{from, value}` turns. `chat_template`: a `messages` "
        "list of `{role, content}` turns (OpenAI style). `alpaca`: `instruction`, optional `input`, `output`, "
        "optional `system`, trained as a one-turn conversation. `completion`: raw text in `field`, every token "
        "trained.",
        "data",
    )
    conversation: Literal["chatml"] = key(
        "chatml", "Prompt format for `sharegpt` rows (axolotl 0.4 key); only `chatml`.", "data"
    )
    ds_type: Literal["json", "parquet", "csv", "arrow"] | None = key(
        None, "File type, when the extension does not say it.", "data"
    )
    data_files: str | list[str] | None = key(
        None, "Files to load inside `path` (a directory or a hub dataset).", "data"
    )
    split: str = key("train", "Split to load from a hub dataset.", "data")
    name: str | None = key(None, "Configuration name of a hub dataset.", "data")
    field_messages: str | None = key(
        None,
        "Column holding the turns (default: `conversations` for sharegpt, `messages` for chat_template).",
        "data",
    )
    message_property_mappings: dict[str, str] | None = key(
        None,
        "Keys of each turn: `{role: ..., content: ...}` (default `from`/`value` for sharegpt, "
        "`role`/`content` for chat_template).",
        "data",
    )
    roles: dict[str, list[str]] | None = key(
        None,
        "Role names in the data for each role (`system`, `user`, `assistant`, `tool`), e.g. "
        "`{user: [human, user], assistant: [gpt, bot]}`; replaces the default mapping.",
        "data",
    )
    field: str | None = key(None, "Column holding the text of `completion` rows (default `text`).", "data")
    roles_to_train: list[Literal["system", "user", "assistant", "tool"]] = key(
        ["assistant"], "Roles whose turns are trained.", "data"
    )
    train_on_eos: Literal["turn", "last", "all", "none"] = key(
        "turn",
        "Which end-of-turn tokens are trained: `turn` those closing a trained turn, `last` only the last one, "
        "`all` every turn's, `none` no end-of-turn token.",
        "data",
    )
    drop_system_message: bool = key(False, "Remove system turns from this dataset's conversations.", "data")


class SpecialTokens(_Strict):
    """`special_tokens:` tokens set on the tokenizer (added to the vocabulary when new)."""

    bos_token: str | None = key(None, "Beginning-of-sequence token.", "model")
    eos_token: str | None = key(None, "End-of-sequence token; `<|im_end|>` for ChatML chat models.", "model")
    pad_token: str | None = key(None, "Padding token (never trained on).", "model")
    unk_token: str | None = key(None, "Unknown token.", "model")


class Config(_Strict):
    """A whole run. Immutable once loaded; values derived from it live in `RuntimeSettings` and plans."""

    # ---- model ---------------------------------------------------------------------------------
    base_model: str = key(
        ...,
        "Hugging Face model id or local directory. With `train_from_scratch: true`, only its config.json "
        "is used and the weights are randomly initialised.",
        "model",
    )
    base_model_config: str | None = key(
        None, "Where to read the model's config.json from, if not `base_model`.", "model"
    )
    model_type: str = key(
        "AutoModelForCausalLM",
        "transformers class used to load the model (`AutoModelForCausalLM` or a `...ForCausalLM` class).",
        "model",
    )
    tokenizer_config: str | None = key(None, "Tokenizer id or directory, if not `base_model`.", "model")
    tokenizer_type: str = key(
        "AutoTokenizer",
        "transformers tokenizer class that loads the tokenizer (`AutoTokenizer`, or a class such as "
        "`PreTrainedTokenizerFast`); it must give a fast (Rust) tokenizer.",
        "model",
    )
    tokenizer_use_fast: bool = key(
        True,
        "axolotl's switch for the slow tokenizer. dolphin-train always uses the Rust (fast) tokenizer, whose "
        "character offsets the masking relies on and whose ids equal the slow tokenizer's; `false` says so in "
        "the log (the Dolphin 2.9 recipe sets it).",
        "model",
    )
    trust_remote_code: bool = key(
        False, "Allow model code from the hub repository to run. Off unless you opt in.", "model"
    )
    model_config_overrides: dict[str, Any] | None = key(
        None,
        "Values that override the model's config.json (for example `rope_scaling`).",
        "model",
        alias="model_config",
    )
    train_from_scratch: bool = key(
        False, "Initialise the weights randomly from the model config instead of loading them.", "model"
    )
    special_tokens: SpecialTokens = key(SpecialTokens(), "Tokens to set as bos/eos/pad/unk.", "model")
    tokens: list[str] = key(
        [],
        "Extra tokens added to the vocabulary (for example `<|im_start|>`, `<|im_end|>`); embeddings are "
        "resized and new rows start at the mean of the existing ones.",
        "model",
    )
    load_in_8bit: bool = key(
        False, "Load the base weights in 8 bits (bitsandbytes LLM.int8); needs `adapter: lora`.", "model"
    )
    load_in_4bit: bool = key(
        False,
        "Load the base weights in 4 bits (bitsandbytes NF4, double quantisation, compute dtype from "
        "bf16/fp16, quant storage set for ZeRO-3 sharding); needs `adapter: qlora`.",
        "model",
    )
    adapter: Literal["lora", "qlora"] | None = key(
        None,
        "Train a LoRA adapter (`lora`) or a LoRA over 4-bit base weights (`qlora`) instead of all weights.",
        "model",
    )
    lora_r: int = key(8, "LoRA rank.", "model", ge=1)
    lora_alpha: int = key(16, "LoRA scaling numerator (the update is scaled by alpha / r).", "model", ge=1)
    lora_dropout: float = key(0.0, "Dropout on the LoRA input.", "model", ge=0, lt=1)
    lora_target_modules: list[str] | None = key(
        None, "Module names LoRA adapts (e.g. `[q_proj, v_proj]`); default every linear layer.", "model"
    )
    lora_target_linear: bool | None = key(
        None,
        "Adapt every linear layer except the output head (the default when no modules are named); `false` "
        "requires `lora_target_modules`.",
        "model",
    )
    lora_modules_to_save: list[str] | None = key(
        None,
        "Modules trained in full next to the adapter. When tokens are added, the input and output embeddings "
        "are added automatically; a list without them is rejected then, since the new rows would stay untrained.",
        "model",
    )
    lora_model_dir: str | None = key(None, "Continue training from this saved adapter.", "model")
    peft_use_dora: bool = key(False, "DoRA: weight-decomposed LoRA.", "model")
    peft_use_rslora: bool = key(False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.", "model")
    strict: bool = key(
        False,
        "axolotl's `strict`; only `false` (dolphin-train always rejects unknown keys).",
        "model",
        unsupported=True,
    )
    flash_attention: bool = key(
        False,
        "Use flash-attn 2 varlen kernels when installed on a CUDA machine; otherwise the best available "
        "backend is used and logged (PyTorch SDPA with a block-diagonal mask for packed rows).",
        "model",
    )
    sdp_attention: bool = key(False, "Use PyTorch scaled-dot-product attention (the default).", "model")
    xformers_attention: bool = key(False, "xformers attention.", "model", unsupported=True)
    attn_implementation: str | None = key(
        None,
        "Force a transformers attention implementation (`sdpa`, `eager`, `flash_attention_2`...).",
        "model",
    )

    # ---- data ----------------------------------------------------------------------------------
    datasets: list[DatasetConfig] = key(..., "Training data, mixed together.", "data", min_length=1)
    chat_template: Literal["chatml", "tokenizer_default"] = key(
        "chatml",
        "Template that turns conversations into tokens, saved with the tokenizer. `chatml`, or "
        "`tokenizer_default`: the tokenizer's own Jinja template (e.g. Llama-3-Instruct's), same masking rules.",
        "data",
    )
    default_system_message: str | None = key(None, "System message added to conversations that have none.", "data")
    skip_invalid_rows: bool = key(
        False,
        "Drop malformed rows (counted per reason) instead of failing before tokenization.",
        "data",
    )
    shuffle_merged_datasets: bool = key(True, "Shuffle the mixed datasets with `seed`.", "data")
    dataset_prepared_path: str = key(
        "last_run_prepared",
        "Directory for the tokenized-data cache; each preparation lives in a subdirectory named by a "
        "fingerprint of the data files' contents, the tokenizer and the keys that change tokens.",
        "data",
    )
    dataset_num_proc: int | None = key(
        None, "Processes used for tokenization (default: the number of CPU cores, at most 8).", "data", ge=1
    )
    val_set_size: float = key(
        0.0,
        "Held-out evaluation set: a fraction of the rows (0 < x < 1) or a number of rows (x >= 1); split with `seed`.",
        "data",
        ge=0,
    )
    sequence_len: int = key(2048, "Maximum tokens per training row.", "data", ge=16)
    excess_length_strategy: Literal["drop", "truncate"] = key(
        "drop",
        "What happens to a conversation longer than `sequence_len`: `drop` it, or `truncate` it to "
        "`sequence_len` tokens. Either way it is counted and reported.",
        "data",
    )
    train_on_inputs: bool = key(
        False, "Train on every token (system and user turns included), not only assistant turns.", "data"
    )
    sample_packing: bool = key(
        False,
        "Pack several conversations into each row of `sequence_len` tokens (position ids restart per "
        "conversation; attention never crosses conversations).",
        "data",
    )
    eval_sample_packing: bool | None = key(
        None, "Pack the evaluation set too (default: same as `sample_packing`).", "data"
    )
    pad_to_sequence_len: bool = key(
        False, "Pad every row to exactly `sequence_len` tokens (stable memory use and kernel shapes).", "data"
    )
    group_by_length: bool = key(False, "Batch rows of similar length.", "data", unsupported=True)

    # ---- training ------------------------------------------------------------------------------
    output_dir: str = key("./outputs", "Where checkpoints and the final model are written.")
    micro_batch_size: int = key(1, "Rows per device per forward pass.", ge=1)
    gradient_accumulation_steps: int = key(1, "Micro-batches accumulated per optimizer step.", ge=1)
    num_epochs: float = key(1.0, "Passes over the training data.", gt=0)
    max_steps: int | None = key(None, "Stop after this many optimizer steps (overrides `num_epochs`).", ge=1)
    learning_rate: float = key(2e-5, "Peak learning rate.", gt=0)
    lr_scheduler: str = key("cosine", f"Learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}.")
    lr_scheduler_kwargs: dict[str, Any] | None = key(None, "Extra arguments for the scheduler.")
    warmup_steps: int | None = key(None, "Linear warmup, in optimizer steps.", ge=0)
    warmup_ratio: float | None = key(None, "Linear warmup, as a fraction of all steps.", ge=0, lt=1)
    weight_decay: float = key(0.0, "Decoupled weight decay.", ge=0)
    optimizer: str = key("adamw_torch", f"Optimizer, by its transformers name: {', '.join(OPTIMIZERS)}.")
    adam_beta1: float | None = key(None, "Adam beta1 (default 0.9).", gt=0, lt=1)
    adam_beta2: float | None = key(None, "Adam beta2 (default 0.999).", gt=0, lt=1)
    adam_epsilon: float | None = key(None, "Adam epsilon (default 1e-8).", gt=0)
    max_grad_norm: float = key(1.0, "Gradient clipping norm (0 disables clipping).", ge=0)
    bf16: bool | Literal["auto"] = key(
        "auto", "bfloat16 mixed precision; `auto`: on when the GPU supports it, off on the CPU."
    )
    fp16: bool | None = key(None, "float16 mixed precision (only when bf16 is off).")
    tf32: bool | Literal["auto"] = key(False, "Allow TF32 matmuls on Ampere or newer GPUs; `auto`: when available.")
    gradient_checkpointing: bool = key(False, "Recompute activations in the backward pass to save memory.")
    chunked_cross_entropy: bool | None = key(
        None,
        "Compute the loss from hidden states in chunks, only at trained positions, so the full logits "
        "(tokens x vocabulary) are never materialised. Default: on for vocabularies of 64k tokens or more, "
        "unless `lm_head` is in `lora_target_modules` (not supported).",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = key(
        None, "Arguments for gradient checkpointing, e.g. `use_reentrant: false`."
    )
    seed: int = key(
        42,
        "Seed for data splitting, shuffling, packing order and initialisation (a from-scratch model, a new "
        "LoRA adapter).",
    )
    resume_from_checkpoint: str | bool | None = key(
        None,
        "A checkpoint directory to resume from, or `true`/`auto` for the latest complete checkpoint in "
        "`output_dir` (`auto` starts fresh when there is none; `true` requires one).",
    )
    stop_on_nan_loss: bool = key(
        True, "Stop, naming the step, when the training loss or gradient norm becomes NaN or infinite."
    )
    early_stopping_patience: int | None = key(None, "Stop when eval loss stops improving.", unsupported=True)

    # ---- evaluation and checkpoints ------------------------------------------------------------
    logging_steps: int = key(1, "Log loss and learning rate every N optimizer steps.", "logging", ge=1)
    evals_per_epoch: int | None = key(None, "Evaluations per epoch (needs `val_set_size`).", "logging", ge=1)
    eval_steps: int | None = key(None, "Evaluate every N steps (instead of `evals_per_epoch`).", "logging", ge=1)
    saves_per_epoch: int | None = key(None, "Checkpoints per epoch.", "logging", ge=1)
    save_steps: int | None = key(None, "Checkpoint every N steps (instead of `saves_per_epoch`).", "logging", ge=1)
    save_total_limit: int | None = key(None, "Keep at most this many checkpoints.", "logging", ge=1)
    wandb_project: str | None = key(None, "Weights & Biases project; logging to wandb is on when set.", "logging")
    wandb_entity: str | None = key(None, "Weights & Biases entity (team or user).", "logging")
    wandb_name: str | None = key(None, "Run name shown in wandb.", "logging")
    wandb_run_id: str | None = key(None, "Run id, to resume a wandb run.", "logging")
    wandb_mode: Literal["online", "offline", "disabled"] | None = key(None, "wandb mode.", "logging")
    wandb_watch: Literal["gradients", "parameters", "all", "false"] | None = key(
        None, "Log gradients and/or parameters to wandb.", "logging"
    )
    wandb_log_model: Literal["checkpoint", "end", "false"] | None = key(
        None, "Upload checkpoints or the final model to wandb.", "logging"
    )
    use_tensorboard: bool = key(
        False,
        "Write TensorBoard event files to `output_dir/runs/` (needs `pip install tensorboard`); can be combined "
        "with wandb.",
        "logging",
    )
    debug: bool = key(False, "axolotl's debug dumps.", "logging", unsupported=True)

    # ---- distributed ---------------------------------------------------------------------------
    deepspeed: str | dict[str, Any] | None = key(
        None,
        "DeepSpeed config: a JSON file path or an inline mapping (see `deepspeed_configs/`).",
        "distributed",
    )
    fsdp: list[str] | str | None = key(
        None,
        "Fully sharded data parallel, the alternative to DeepSpeed: transformers' options, e.g. "
        "`[full_shard, auto_wrap]` (add `offload` to keep parameters on the CPU).",
        "distributed",
    )
    fsdp_config: dict[str, Any] | None = key(
        None,
        "FSDP settings passed to transformers (`fsdp_` prefixes accepted, as axolotl writes them); FSDP2 "
        "(`version: 2`) unless set otherwise; layers to wrap default to the model's own.",
        "distributed",
    )
    local_rank: int | None = key(
        None,
        "Set by the launcher (torchrun, accelerate); leave it empty in the file.",
        "distributed",
        unsupported=True,
    )

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer; allowed: {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(f"unknown scheduler; allowed: {', '.join(LR_SCHEDULERS)}")
        return value

    @field_validator("val_set_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a count of rows (>= 1) must be a whole number; a fraction must be below 1")
        return value

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume_form(cls, value: str | bool | None) -> str | bool | None:
        if value is False or value == "":
            return None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = []
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append("warmup_steps and warmup_ratio: set one, not both")
        if self.evals_per_epoch is not None and self.eval_steps is not None:
            problems.append("evals_per_epoch and eval_steps: set one, not both")
        if self.saves_per_epoch is not None and self.save_steps is not None:
            problems.append("saves_per_epoch and save_steps: set one, not both")
        if self.adapter == "qlora" and not self.load_in_4bit:
            problems.append("adapter: qlora needs load_in_4bit: true")
        if (self.load_in_4bit or self.load_in_8bit) and self.adapter is None:
            problems.append("load_in_4bit/load_in_8bit: quantised weights cannot be trained in full; set adapter")
        if self.train_from_scratch and (self.load_in_4bit or self.load_in_8bit):
            problems.append("train_from_scratch with load_in_4bit/load_in_8bit: there are no weights to quantise")
        if self.load_in_4bit and self.load_in_8bit:
            problems.append("load_in_4bit and load_in_8bit: choose one")
        if self.load_in_4bit and self.adapter == "lora":
            problems.append("load_in_4bit: true with adapter: lora; use adapter: qlora")
        if self.lora_target_modules and self.lora_target_linear:
            problems.append("lora_target_modules and lora_target_linear: set one, not both")
        if self.adapter and self.lora_target_linear is False and not self.lora_target_modules:
            problems.append("lora_target_linear: false leaves LoRA nothing to adapt: name lora_target_modules "
                            "(e.g. [q_proj, v_proj]) or remove lora_target_linear")  # fmt: skip
        if self.chunked_cross_entropy and self.adapts_output_head:
            problems.append("chunked_cross_entropy: true with lm_head in lora_target_modules: the chunked loss "
                            "cannot apply a LoRA-adapted output head; remove one of them")  # fmt: skip
        if self.fsdp and self.deepspeed:
            problems.append("fsdp and deepspeed: choose one way to shard the model")
        if self.fsdp_config and not self.fsdp:
            problems.append("fsdp_config is set but fsdp is not: set fsdp, e.g. [full_shard, auto_wrap]")
        if self.bf16 is True and self.fp16:
            problems.append("bf16 and fp16: choose one precision")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def eval_packing(self) -> bool:
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing

    @property
    def lora_targets(self) -> list[str] | str:
        """The modules LoRA adapts: those named, else every linear layer but the head (peft's `all-linear`)."""
        return self.lora_target_modules or "all-linear"

    @property
    def adapts_output_head(self) -> bool:
        """LoRA on the output head (named in `lora_target_modules`; peft's all-linear leaves it out): its
        logits go through the adapter, which the chunked loss does not reproduce."""
        return bool(self.adapter) and "lm_head" in (self.lora_target_modules or [])


def documented_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Config keys (by their YAML name) mapped to their pydantic field info."""
    return {(info.alias or name): info for name, info in model.model_fields.items()}
