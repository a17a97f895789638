"""The training keys: batch and schedule, optimizer, precision and memory modes, LISA, ReLoRA, sparse
fine-tuning, checkpoints to resume from and the run's stopping rules."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from dolphin_train.config.keys import Section, Strict, key

# Optimizers whose update can run per parameter during the backward pass (`optimizer_in_backward`).
IN_BACKWARD_OPTIMIZERS = ("adamw_torch_8bit", "adamw_torch_4bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
                          "adamw_torch")  # fmt: skip

# Optimizers whose moments ReLoRA prunes (torch's exp_avg/exp_avg_sq, bitsandbytes' state1/state2).
RELORA_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
                     "paged_adamw_32bit")  # fmt: skip

# Optimizers by their transformers names. A curated list (rather than transformers' own enum) keeps
# config validation free of a torch import; a test checks every name against transformers.
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
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


class SparseFinetuning(Strict):
    """`llmcompressor:` axolotl's sparse fine-tuning block (LLM Compressor's recipe format)."""

    recipe: dict[str, Any] | str = key(
        ...,
        "An LLM Compressor recipe: stages whose `*_modifiers` hold one `ConstantPruningModifier` with `targets` "
        "(parameter names, or `re:` regular expressions matched from the start of the name); the zeros of the "
        "targeted weights stay zero for the whole run. Other modifiers are refused.",
        "training",
    )
    save_compressed: bool = key(
        False,
        "Accepted as LLM Compressor reads it today: compressed-tensors no longer has a sparse storage format, so "
        "the model is written dense either way (safetensors), with the recipe next to it as `recipe.yaml`.",
        "training",
    )

    @field_validator("recipe")
    @classmethod
    def _only_constant_pruning(cls, recipe: dict[str, Any] | str) -> dict[str, Any] | str:
        pruning_targets(recipe)
        return recipe

    @property
    def targets(self) -> tuple[str, ...]:
        return pruning_targets(self.recipe)


def pruning_targets(recipe: Any) -> tuple[str, ...]:
    """The `targets` of the recipe's ConstantPruningModifier(s); anything else in the recipe is an error."""
    if not isinstance(recipe, dict):
        raise ValueError("give the recipe inline, as a mapping of stages to their *_modifiers")
    targets: list[str] = []
    for stage_name, stage in recipe.items():
        groups = stage.items() if isinstance(stage, dict) else ()
        modifiers = [(g, m) for g, m in groups if g.endswith("_modifiers") and isinstance(m, dict)]
        if not modifiers:
            raise ValueError(f"recipe stage {stage_name}: expected `<name>_modifiers:` holding the modifiers")
        for _, group in modifiers:
            for name, args in group.items():
                targets += _constant_pruning_targets(name, args or {})
    if not targets:
        raise ValueError("the recipe names no ConstantPruningModifier targets")
    return tuple(targets)


def _constant_pruning_targets(name: str, args: dict[str, Any]) -> list[str]:
    if name != "ConstantPruningModifier":
        raise ValueError(f"{name}: not supported; dolphin-train runs LLM Compressor's ConstantPruningModifier only "
                         "(sparse fine-tuning that keeps a sparse model's zeros)")  # fmt: skip
    unknown = set(args) - {"targets", "start", "end"}
    if unknown:
        raise ValueError(f"ConstantPruningModifier: unknown argument(s) {', '.join(sorted(unknown))}")
    if args.get("start") not in (None, 0, -1) or args.get("end") not in (None, -1):
        raise ValueError("ConstantPruningModifier: the zeros are held for the whole run; a start or end epoch "
                         "other than 0 / -1 is not supported")  # fmt: skip
    targets = args.get("targets")
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError("ConstantPruningModifier: targets must name parameters (e.g. 're:.*q_proj.weight')")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ValueError(f"ConstantPruningModifier target {t!r}: not a regular expression ({e})") from e
    return targets


class TrainingKeys(Section):
    """The optimisation itself: batch, schedule, optimizer, precision, memory modes and training variants."""

    output_dir: str = key("./outputs", "Where checkpoints and the final model are written.")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = key(
        1,
        "Rows per device per forward pass. `auto`: the largest that fits the GPU found at launch (`plan "
        "--gpus N --gpu-memory X` and the run overview say which), with `batch_size` kept as the effective batch.",
    )
    batch_size: int | None = key(
        None,
        "Rows per optimizer step per device (axolotl's key): with `micro_batch_size: auto`, accumulation makes "
        "up the rest, so the effective batch stays as set; without `gradient_accumulation_steps`, as in axolotl, "
        "accumulation is batch_size / micro_batch_size; otherwise it must equal micro_batch_size x "
        "gradient_accumulation_steps.",
        ge=1,
    )
    gradient_accumulation_steps: int = key(1, "Micro-batches accumulated per optimizer step.", ge=1)
    num_epochs: float = key(1.0, "Passes over the training data.", gt=0)
    max_steps: int | None = key(None, "Stop after this many optimizer steps (overrides `num_epochs`).", ge=1)
    learning_rate: float = key(2e-5, "Peak learning rate.", gt=0)
    lr_scheduler: str = key("cosine", f"Learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}.")
    lr_scheduler_kwargs: dict[str, Any] | None = key(None, "Extra arguments for the scheduler.")
    cosine_min_lr_ratio: float | None = key(
        None,
        "With `lr_scheduler: cosine`: decay to `learning_rate` x this ratio instead of 0 (transformers' "
        "`cosine_with_min_lr` schedule, its `min_lr_rate`); 1.0 keeps the learning rate constant after warmup.",
        ge=0,
        le=1,
    )
    cosine_constant_lr_ratio: float | None = key(
        None,
        "With `cosine_min_lr_ratio`: the cosine reaches its minimum after this fraction of all steps and the "
        "learning rate stays there to the end (e.g. 0.8: constant over the last 20%). 0 reads as unset, as in "
        "axolotl: the decay spans the whole run.",
        ge=0,
        le=1,
    )
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
    gradient_checkpointing: bool | Literal["offload", "auto"] = key(
        False,
        "Recompute activations in the backward pass to save memory, keeping only each checkpointed layer's "
        "input. `offload` (axolotl's spelling): checkpointing with `activation_offloading`. `auto`: the "
        "cheapest setting that fits the GPU (none, every 4th or every 2nd layer, all layers, then offloading), "
        "chosen by the plan at launch.",
    )
    gradient_checkpointing_layers: int = key(
        1,
        "Checkpoint every N-th decoder layer (1: all of them; 2: half, so half the recomputation for about "
        "half the saving). Selective checkpointing for when all layers' activations almost fit.",
        ge=1,
    )
    activation_offloading: bool | Literal["auto"] = key(
        False,
        "Keep the checkpointed layers' inputs in (pinned) CPU memory and bring each back for its backward "
        "pass: activation memory on the GPU stays at about one layer's, whatever the sequence length. Needs "
        "`gradient_checkpointing`. `auto`: when the plan finds it needed to fit.",
    )
    tiled_mlp: bool | Literal["auto"] = key(
        False,
        "Run each decoder layer's MLP over the sequence a chunk at a time, keeping only its input and "
        "recomputing each chunk in the backward pass (Arctic Long Sequence Training's TiledMLP): the MLP's "
        "intermediates, the largest activations of a layer, then scale with a chunk instead of the sequence. "
        "For long contexts; costs one more MLP forward pass. Runs under DeepSpeed ZeRO-3 and FSDP2 (not "
        "FSDP1); Liger's MLP kernel is then left off. `auto`: when the plan finds it needed to fit.",
    )
    tiled_mlp_num_shards: int | None = key(
        None,
        "Chunks the sequence is split into for `tiled_mlp` (default: chunks of about 1,024 tokens, or of "
        "`hidden_size` tokens when that is smaller).",
        ge=1,
    )
    fp8: bool = key(
        False,
        "Float8 matrix products for the decoder's linear layers (torchao's float8 training, rowwise scaling: "
        "each row of activations and each column of weights scaled to the float8 range on its own), on GPUs "
        "with compute capability 8.9 or newer (H100, H200, L40S). Full fine-tuning; the output head stays "
        "bf16. Faster matrix products for a small loss in precision (the GPU check compares the loss curve).",
    )
    fp8_enable_fsdp_float8_all_gather: bool = key(
        False,
        "With `fp8: true` and FSDP2: FSDP gathers the sharded weights in float8 rather than bf16 (half the "
        "all-gather traffic; torchao's `enable_fsdp_float8_all_gather`). This needs one scale per weight, so "
        "the float8 layers use tensorwise scaling instead of rowwise.",
        "distributed",
    )
    torch_compile: bool | Literal["auto"] = key(
        False,
        "Compile each decoder layer with torch.compile (regional compilation: minutes less to compile than the "
        "whole model, and it works with checkpointing); the first step's compilation time is reported apart "
        "from the step time. `auto`: on a CUDA GPU.",
    )
    torch_compile_backend: str | None = key(
        None, "torch.compile backend (default `inductor`; `aot_eager` checks the compiled graph without codegen)."
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = key(
        None,
        "torch.compile's mode for the compiled layers (inductor only): `max-autotune` searches the fastest "
        "kernels (a longer first step), `reduce-overhead` adds CUDA graphs.",
    )
    optimizer_in_backward: bool = key(
        False,
        "Update each parameter during the backward pass, as soon as its gradient is complete, and free the "
        "gradient at once: full gradients are never held (for full fine-tuning on one GPU, with `bfloat16: "
        "true` and `optimizer: adamw_torch_8bit`, whose updates round stochastically). One process; needs "
        f"`gradient_accumulation_steps: 1` and `max_grad_norm: 0`, and not `fp16` (whose loss scaling is undone only "
        f"at the usual step); optimizers: {', '.join(IN_BACKWARD_OPTIMIZERS)}.",
    )
    lisa_n_layers: int | None = key(
        None,
        "LISA (layerwise importance sampling): full fine-tuning in which only this many decoder layers, drawn "
        "at random, are trained at a time (the embeddings, final norm and output head always are), drawn anew "
        "every `lisa_step_interval` steps; the draw depends only on `seed` and the step, so a resumed run draws "
        "the same layers. One process, no adapter, DeepSpeed or FSDP. The plan counts every layer as trained "
        "(the optimizer keeps states for each layer once drawn).",
        ge=1,
    )
    lisa_step_interval: int | None = key(
        None, "Optimizer steps between two draws of LISA's layers (default 20).", ge=1
    )
    lisa_layers_attribute: str | None = key(
        None,
        "Where LISA finds the decoder layers: a dotted path from the model, e.g. `model.layers` (default: the "
        "model's longest list of modules, its decoder layers).",
    )
    relora: bool | None = key(
        None,
        "ReLoRA (arXiv:2307.05695): every `jagged_restart_steps` optimizer steps, merge the LoRA update into the "
        "base weights (kept in float32 for a 4-bit or 16-bit base, which the next cycle trains over quantised or "
        "rounded again), start LoRA again (its update zero) and prune its optimizer states "
        "(`relora_prune_ratio`), with the jagged learning-rate schedule: a sum of low-rank updates reaches a "
        "high-rank one. Needs `adapter: lora` or `qlora` with Adam (`adamw_torch`, `adamw_torch_fused`, "
        "bitsandbytes' AdamW); LoRA on linear layers and embeddings; no DeepSpeed, FSDP, 8-bit base or DoRA. "
        "Checkpoints after the first restart also hold the float32 merged weights (`relora_base.safetensors`, "
        "for resuming); the final output is the whole merged model (in the base's dtype, a 4-bit base's compute "
        "dtype), not an adapter.",
    )
    relora_prune_ratio: float | None = key(
        None,
        "Fraction of each LoRA parameter's Adam moments zeroed at every ReLoRA restart (default 0.9; 0.999 with "
        "`relora_prune_method: reset`). bitsandbytes' 8-bit moments are pruned by their values.",
        ge=0.0,
        le=1.0,
    )
    relora_prune_method: Literal["magnitude", "random", "reset"] | None = key(
        None,
        "How ReLoRA prunes the moments: `magnitude` (default) zeroes the smallest, `random` a random fraction, "
        "`reset` a random 99.9% unless `relora_prune_ratio` says otherwise (the paper's reset). Random draws "
        "depend on `seed` and the restart.",
    )
    relora_cpu_offload: bool | None = key(
        None,
        "Keep ReLoRA's float32 merged weights (4 bytes per adapted weight of a 4-bit or 16-bit base) and do its "
        "merge arithmetic in CPU memory, to spare GPU memory.",
    )
    jagged_restart_steps: int | None = key(
        None,
        "Optimizer steps between two ReLoRA restarts; on its own, the period of the jagged learning-rate "
        "schedule: the configured schedule multiplied by a factor that falls at each restart to "
        "`cosine_min_lr_ratio` (0.001 without one, as in axolotl), rises "
        "back over `jagged_restart_warmup_steps` and falls over `jagged_restart_anneal_steps` before the next.",
        ge=1,
    )
    jagged_restart_warmup_steps: int | bool | None = key(
        None, "Warmup steps after each jagged restart (default 10; 0 or `false` too means 10, as in axolotl).", ge=0
    )
    jagged_restart_anneal_steps: int | bool | None = key(
        None,
        "Steps of the fall before each jagged restart after the first; the factor is (steps left)/(this), "
        "so 1, the default (also for 0 or `false`), means none.",
        ge=0,
    )
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
    early_stopping_patience: int | None = key(
        None,
        "Stop when the evaluation loss has not improved on its best for this many evaluations in a row (needs "
        "`val_set_size`); the log names the step of the best loss. The final model is the last weights: keep "
        "checkpoints (`save_steps`) to go back to the best one.",
        ge=1,
    )
    llmcompressor: SparseFinetuning | None = key(
        None,
        "Sparse fine-tuning (axolotl's LLM Compressor plugin): full fine-tuning of a sparse model (e.g. 2:4 "
        "sparse) in which the targeted weights' zeros stay zero. Weights of magnitude up to 1e-8 count as zero "
        "(LLM Compressor's threshold) and are set to 0 at the start; their gradients are zeroed and they are set "
        "back to 0 after each optimizer step (a one-bit mask). Keys: `recipe`, `save_compressed`.",
    )
    loss_watchdog_threshold: float | None = key(
        None,
        "Stop, naming the step, when the logged training loss stays above this value for "
        "`loss_watchdog_patience` logs in a row (learning has broken down; about twice the starting loss is a "
        "good value).",
        gt=0,
    )
    loss_watchdog_patience: int | None = key(
        None, "Logged steps in a row above `loss_watchdog_threshold` before stopping (default 3).", ge=1
    )
    auto_resume_from_checkpoints: bool = key(
        False,
        "When `resume_from_checkpoint` is not set: resume from the latest complete checkpoint in `output_dir` "
        "if there is one (as `resume_from_checkpoint: auto`).",
    )
    cut_cross_entropy: bool | None = key(
        None,
        "axolotl's CutCrossEntropy switch (on when its plugin is listed): asks for `chunked_cross_entropy`, "
        "which likewise never materialises the logits.",
    )

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer; allowed: {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("jagged_restart_warmup_steps", "jagged_restart_anneal_steps")
    @classmethod
    def _steps_or_false(cls, value: int | bool | None) -> int | bool | None:
        # axolotl's example writes `false` for "the default"; `true` has no meaning
        if value is True:
            raise ValueError("a number of steps is expected (or false for the default), not true")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(f"unknown scheduler; allowed: {', '.join(LR_SCHEDULERS)}")
        return value

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume_form(cls, value: str | bool | None) -> str | bool | None:
        if value is False or value == "":
            return None
        return value

    @property
    def loss_watchdog(self) -> tuple[float, int] | None:
        """(threshold, patience) of the loss watchdog, or None when it is off."""
        if self.loss_watchdog_threshold is None:
            return None
        return self.loss_watchdog_threshold, self.loss_watchdog_patience or 3

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing on (`auto` resolved first: see plan/auto.py)."""
        return self.gradient_checkpointing in (True, "offload")

    @property
    def offloads_activations(self) -> bool:
        return self.activation_offloading is True or self.gradient_checkpointing == "offload"

    @property
    def has_auto_memory_settings(self) -> bool:
        return "auto" in (self.micro_batch_size, self.gradient_checkpointing, self.activation_offloading,
                          self.tiled_mlp)
