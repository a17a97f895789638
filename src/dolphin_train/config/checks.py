"""The checks across keys: every combination of keys that contradict each other or configure nothing, in one
place. `Config` (schema.py) inherits them and runs `_cross_section_problems` once its keys are read."""

from __future__ import annotations

from dolphin_train.config.sections.kernels import (
    ATTENTION_NAMES,
    FLEX_COMPILE_KEYS,
    FLEX_COMPILE_MODES,
    LIGER_PLUGIN,
    SPARSE_PLUGIN,
)
from dolphin_train.config.sections.model import ROPE_TYPES, ROPE_TYPES_WITH_FACTOR
from dolphin_train.config.sections.training import IN_BACKWARD_OPTIMIZERS, RELORA_OPTIMIZERS


class CrossSectionChecks:
    """Mixed into `Config`: each method reads the keys of several sections (through `self`, the whole config)."""

    def _cross_section_problems(self) -> list[str]:
        """Every problem found, as one message each (the load error lists them all)."""
        problems = self._memory_mode_problems() + self._rope_problems()
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
        problems += self._loftq_problems()
        problems += self._bnb_problems()
        if self.lora_target_linear and self.names_output_head:
            problems.append("lora_target_linear: true adapts every linear layer but the output head, and lm_head "
                            "cannot be added to it: list every module in lora_target_modules instead")  # fmt: skip
        if self.adapter and self.lora_target_linear is False and not self.lora_target_modules:
            problems.append("lora_target_linear: false leaves LoRA nothing to adapt: name lora_target_modules "
                            "(e.g. [q_proj, v_proj]) or remove lora_target_linear")  # fmt: skip
        if self.chunked_loss_choice and self.adapts_output_head:
            problems.append("chunked_cross_entropy: true with lm_head in lora_target_modules: the chunked loss "
                            "cannot apply a LoRA-adapted output head; remove one of them")  # fmt: skip
        if self.fsdp and self.deepspeed:
            problems.append("fsdp and deepspeed: choose one way to shard the model")
        if self.fsdp_version and not self.fsdp:
            problems.append("fsdp_version: no effect without fsdp_config (or an fsdp list)")
        if self.fsdp_version and (self.fsdp_config or {}).get("version", self.fsdp_version) != self.fsdp_version:
            problems.append("fsdp_version and fsdp_config's version disagree: set one")
        if self.fsdp_config and not self.fsdp:
            problems.append("fsdp_config is set but fsdp is not: set fsdp, e.g. [full_shard, auto_wrap]")
        if self.bf16 is True and self.fp16:
            problems.append("bf16 and fp16: choose one precision")
        if self.bfloat16 and self.fp16:
            problems.append("bfloat16 weights with fp16 mixed precision: use bf16")
        if self.float16 and (self.bfloat16 or self.bf16 is True or self.fp16):
            problems.append("float16 weights compute in float16 without mixed precision: remove bfloat16, "
                            "bf16: true and fp16: true, or float16")  # fmt: skip
        forced = ATTENTION_NAMES.get(self.attn_implementation or "", self.attn_implementation)
        if self.attention and self.attn_implementation and ATTENTION_NAMES[self.attention] != forced:
            problems.append("attention and attn_implementation disagree: set one")
        if self.gemma4_hybrid_attn_impl and (
            self.attention_backend not in (None, "flash_attention_2") or self.xformers_attention
        ):
            chosen = self.attention_backend or "xformers"
            problems.append(f"gemma4_hybrid_attn_impl runs the sliding-window layers under flash_attention_2, but "
                            f"attention is set to {chosen}: remove one of them")  # fmt: skip
        if self.xformers_attention and (self.flash_attention or self.attention_backend not in (None, "sdpa")):
            problems.append("xformers_attention with another attention backend: choose one")
        asks_liger = LIGER_PLUGIN in (self.plugins or []) or any(self.liger_kernel_config.values())
        asks_liger = asks_liger or bool(self.liger_rms_norm_gated)
        if self.liger_kernel is False and asks_liger:
            problems.append("liger_kernel: false, but the LigerPlugin or liger_* keys ask for Liger's kernels")
        for old, liger in (("flash_attn_fuse_mlp", "liger_glu_activation"), ("flash_attn_rms_norm", "liger_rms_norm"),
                           ("fused_attn_kernel", "liger_rms_norm"), ("fused_attn_kernel", "liger_rope")):
            if getattr(self, old) and getattr(self, liger) is False:
                problems.append(f"{old}: true asks for Liger's fused kernel, but {liger} is false")
        if self.cut_cross_entropy and self.chunked_cross_entropy is False:
            problems.append("cut_cross_entropy: true asks for the chunked loss, but chunked_cross_entropy is false")
        if self.liger_fused_linear_cross_entropy and self.adapts_output_head:
            problems.append("liger_fused_linear_cross_entropy: true computes the logits from the output head's "
                            "own weight, without the LoRA adapter lora_target_modules puts on lm_head: remove "
                            "one")  # fmt: skip
        problems += self._lisa_problems()
        problems += self._relora_problems()
        problems += self._schedule_problems() + self._packing_order_problems()
        problems += self._fp8_problems() + self._flex_compile_problems()
        if self.save_only_model and "SHARDED" in str((self.fsdp_config or {}).get("state_dict_type", "")).upper():
            problems.append("save_only_model writes the whole model's weights, which FSDP's sharded checkpoints "
                            "do not: set fsdp_config's state_dict_type: FULL_STATE_DICT, or remove "
                            "save_only_model")  # fmt: skip
        inductor = self.torch_compile is not False and self.torch_compile_backend in (None, "inductor")
        if self.torch_compile_mode and not inductor:
            problems.append("torch_compile_mode applies to layers compiled with the inductor backend: set "
                            "torch_compile: true (or auto) and no other torch_compile_backend")  # fmt: skip
        if self.early_stopping_patience and not self.val_set_size:
            problems.append("early_stopping_patience watches the evaluation loss: set val_set_size")
        problems += self._lora_kernel_problems()
        problems += self._sparse_problems()
        stray = [k for k in ("ray_num_workers", "ray_run_name", "resources_per_worker") if getattr(self, k)]
        if stray and not self.use_ray:
            problems.append(f"{', '.join(stray)}: no effect without use_ray: true")
        problems += self._generation_eval_problems()
        problems += self._context_parallel_problems()
        if self.use_wandb is False and self.wandb_project:
            problems.append("use_wandb: false, but wandb_project is set (axolotl then logs to wandb): remove one")
        if not self.use_otel_metrics:
            problems += self._set_without(("otel_metrics_host", "otel_metrics_port"), "use_otel_metrics: true")
        if self.eot_tokens is not None and self.template_name == "chatml" and self.eot_tokens != ["<|im_end|>"]:
            problems.append("eot_tokens: chatml ends every turn with <|im_end|>; set [<|im_end|>] or remove it")
        return problems

    def _sparse_problems(self) -> list[str]:
        if SPARSE_PLUGIN in (self.plugins or []) and self.llmcompressor is None:
            return [f"{SPARSE_PLUGIN}: set llmcompressor (its recipe) or remove the plugin"]
        if self.llmcompressor is None:
            return []
        clashes = {"adapter": self.adapter, "deepspeed": self.deepspeed, "fsdp": self.fsdp,
                   "lisa_n_layers": self.lisa_n_layers}  # fmt: skip
        named = [k for k, v in clashes.items() if v]
        if named:
            return [f"llmcompressor: sparse fine-tuning trains the sparse weights themselves, one process or DDP; "
                    f"not with {', '.join(named)}"]  # fmt: skip
        return []

    def _lora_kernel_problems(self) -> list[str]:
        kernels = ", ".join(self.lora_kernels)
        if not kernels:
            return []
        problems = []
        if not self.adapter:
            problems.append(f"{kernels}: fuses LoRA projections; set adapter: lora or qlora")
        if self.lora_dropout:
            problems.append(f"{kernels}: the fused functions apply no dropout: set lora_dropout: 0")
        if self.load_in_8bit:
            problems.append(f"{kernels}: not for 8-bit base weights; use load_in_4bit (adapter: qlora) or neither")
        if self.lora_mlp_kernel and self.liger_kernel_config.get("swiglu"):
            problems.append("lora_mlp_kernel: true and liger_glu_activation: true (or flash_attn_fuse_mlp) both "
                            "replace the gated MLP's forward, and only one can run: keep one")  # fmt: skip
        if self.deepspeed or self.fsdp:
            problems.append(f"{kernels} with deepspeed/fsdp: not supported yet (the fused MLP reads its "
                            "projections' weights without calling them, where sharding gathers them)")  # fmt: skip
        return problems

    def _generation_eval_problems(self) -> list[str]:
        problems = []
        if self.eval_causal_lm_metrics and not self.do_causal_lm_eval:
            problems.append("eval_causal_lm_metrics: no effect without do_causal_lm_eval: true")
        if "comet" in (self.eval_causal_lm_metrics or []):
            problems.append("eval_causal_lm_metrics: comet scores with a neural model downloaded from the hub, "
                            "which a training run does not load: use sacrebleu, chrf, ter or perplexity")  # fmt: skip
        if not self.generates_at_evaluation:
            return problems
        asked = "eval_table_size" if self.eval_table_size else "do_causal_lm_eval"
        if not self.val_set_size:
            problems.append(f"{asked} generates from the evaluation set: set val_set_size")
        if self.deepspeed or self.fsdp:
            problems.append(f"{asked} with {'deepspeed' if self.deepspeed else 'fsdp'}: generating from sharded "
                            "weights needs every process in step for each token, which is not supported: remove "
                            f"{asked}, or train with DDP (several processes, no deepspeed or fsdp)")  # fmt: skip
        if self.train_on_inputs:
            problems.append(f"{asked} with train_on_inputs: true: every token is trained, so no turn has a prompt "
                            "to generate from")  # fmt: skip
        return problems

    def _bnb_problems(self) -> list[str]:
        """`bnb_config_kwargs` that would contradict another key (or configure nothing)."""
        kwargs = self.bnb_config_kwargs or {}
        if not kwargs:
            return []
        if not (self.load_in_4bit or self.load_in_8bit):
            return ["bnb_config_kwargs: configures bitsandbytes quantisation, but neither load_in_4bit nor "
                    "load_in_8bit is set"]  # fmt: skip
        problems = []
        four_bit = [k for k in kwargs if k.startswith("bnb_4bit_")]
        if self.load_in_8bit and four_bit:
            problems.append(f"bnb_config_kwargs: {', '.join(four_bit)} apply to load_in_4bit, not load_in_8bit")
        wanted = "bfloat16" if self.bf16 is True or self.bfloat16 else "float16" if self.fp16 or self.float16 else None
        asked = kwargs.get("bnb_4bit_compute_dtype")
        if asked and wanted and asked != wanted:
            problems.append(f"bnb_config_kwargs: bnb_4bit_compute_dtype: {asked} contradicts the {wanted} "
                            "precision set by bf16/fp16: remove it (the compute dtype follows bf16/fp16)")  # fmt: skip
        if "bnb_4bit_quant_storage" in kwargs and (self.deepspeed or self.fsdp):
            problems.append("bnb_config_kwargs: bnb_4bit_quant_storage is the compute dtype under DeepSpeed/FSDP "
                            "(so the 4-bit weights shard like the others): remove it")  # fmt: skip
        return problems

    def _set_without(self, keys: tuple[str, ...], switch: str) -> list[str]:
        """The keys of `keys` that are set while the feature they configure (`switch`) is off."""
        stray = [k for k in keys if getattr(self, k) is not None]
        return [f"{', '.join(stray)}: no effect without {switch}"] if stray else []

    def _lisa_problems(self) -> list[str]:
        if not self.lisa_n_layers:
            return self._set_without(("lisa_step_interval", "lisa_layers_attribute"), "lisa_n_layers")
        clashes = {"adapter": self.adapter, "deepspeed": self.deepspeed, "fsdp": self.fsdp,
                   "unfrozen_parameters": self.unfrozen_parameters, "optimizer_in_backward": self.optimizer_in_backward}
        named = [k for k, v in clashes.items() if v]  # fmt: skip
        if named:
            why = "lisa_n_layers trains a changing set of whole layers"
            return [f"{why}: it cannot be combined with {', '.join(named)}"]
        return []

    def _loftq_problems(self) -> list[str]:
        if self.loftq is None:
            return []
        if self.adapter != "lora" or self.load_in_4bit or self.load_in_8bit:
            return ["peft.loftq_config: LoftQ quantises the base itself and initialises the adapter from what the "
                    "quantisation lost (peft: pass it an unquantised model): use adapter: lora without "
                    "load_in_4bit/load_in_8bit"]  # fmt: skip
        if self.lora_model_dir:
            return ["peft.loftq_config initialises a new adapter; lora_model_dir continues a saved one (a LoftQ "
                    "adapter's quantised base is read from its directory): remove one of them"]  # fmt: skip
        if self.peft_use_dora:
            return ["peft.loftq_config with peft_use_dora: DoRA's magnitudes would be taken from the weights "
                    "before LoftQ replaced them; use one of them"]  # fmt: skip
        return []

    def _relora_problems(self) -> list[str]:
        if not self.relora:
            stray = [k for k in ("relora_prune_ratio", "relora_prune_method") if getattr(self, k) is not None]
            stray += ["relora_cpu_offload"] if self.relora_cpu_offload else []
            if not self.jagged_restart_steps:
                stray += [k for k in ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps") if getattr(self, k)]
            return [f"{', '.join(stray)}: no effect without relora: true (and jagged_restart_steps)"] if stray else []
        problems = []
        if not self.jagged_restart_steps:
            problems.append("relora: true restarts LoRA every jagged_restart_steps steps: set jagged_restart_steps")
        if self.adapter not in ("lora", "qlora"):
            problems.append(f"relora: true merges and restarts a LoRA adapter: set adapter: lora or qlora (it is "
                            f"{self.adapter or 'not set'})")  # fmt: skip
        clashes = {"deepspeed": self.deepspeed, "fsdp": self.fsdp, "load_in_8bit": self.load_in_8bit,
                   "peft_use_dora": self.peft_use_dora, "optimizer_in_backward": self.optimizer_in_backward,
                   "peft.loftq_config": self.loftq}
        named = [k for k, v in clashes.items() if v]  # fmt: skip
        if named:
            problems.append(f"relora: true merges whole unsharded 16-bit or 4-bit base weights with a plain LoRA "
                            f"update: it cannot be combined with {', '.join(named)}")  # fmt: skip
        if self.optimizer not in RELORA_OPTIMIZERS:
            problems.append(f"relora: true prunes Adam's moments at each restart; optimizer: {self.optimizer} is not "
                            f"one it knows: use one of {', '.join(RELORA_OPTIMIZERS)}")  # fmt: skip
        return problems

    def _schedule_problems(self) -> list[str]:
        problems = []
        if self.cosine_min_lr_ratio is not None and self.lr_scheduler != "cosine":
            problems.append(f"cosine_min_lr_ratio shapes the cosine schedule, but lr_scheduler is {self.lr_scheduler}: "
                            "set lr_scheduler: cosine (or remove cosine_min_lr_ratio)")  # fmt: skip
        if self.cosine_constant_lr_ratio is not None and self.cosine_min_lr_ratio is None:
            problems.append("cosine_constant_lr_ratio holds the learning rate at the cosine's minimum: set "
                            "cosine_min_lr_ratio too (e.g. 0.1)")  # fmt: skip
        if self.cosine_constant_lr_ratio and self.lr_scheduler_kwargs:
            problems.append("cosine_constant_lr_ratio builds its own schedule, which takes no lr_scheduler_kwargs: "
                            "remove one of them")  # fmt: skip
        return problems

    def _packing_order_problems(self) -> list[str]:
        problems = []
        if self.sample_packing_sequentially and not self.sample_packing:
            problems.append("sample_packing_sequentially: no effect without sample_packing: true")
        if self.curriculum_sampling and self.sample_packing and not self.sample_packing_sequentially:
            problems.append("curriculum_sampling keeps the rows in order, but sample_packing groups them by length: "
                            "set sample_packing_sequentially: true too")  # fmt: skip
        return problems

    def _fp8_problems(self) -> list[str]:
        if not self.fp8_enable_fsdp_float8_all_gather:
            return []
        if not (self.fp8 and self.fsdp_version_in_use == 2):
            return ["fp8_enable_fsdp_float8_all_gather gathers FSDP2's float8 weights: it needs fp8: true and FSDP2 "
                    "(fsdp_version: 2 with fsdp_config)"]  # fmt: skip
        return []

    def _flex_compile_problems(self) -> list[str]:
        if self.flex_attn_compile_kwargs is None:
            return []
        problems = []
        if self.attention_backend != "flex_attention":
            problems.append("flex_attn_compile_kwargs compiles flex attention: set attn_implementation: "
                            "flex_attention (or remove flex_attn_compile_kwargs)")  # fmt: skip
        mode = self.flex_attn_compile_kwargs.get("mode")
        if mode is not None and mode not in FLEX_COMPILE_MODES:
            problems.append(f"flex_attn_compile_kwargs: mode {mode!r} is not a torch.compile mode (one of "
                            f"{', '.join(FLEX_COMPILE_MODES)})")  # fmt: skip
        unknown = sorted(set(self.flex_attn_compile_kwargs) - set(FLEX_COMPILE_KEYS))
        if unknown:
            problems.append(f"flex_attn_compile_kwargs: {', '.join(unknown)} is not a torch.compile argument here "
                            f"(use {', '.join(FLEX_COMPILE_KEYS)})")  # fmt: skip
        return problems

    def _rope_problems(self) -> list[str]:
        problems = []
        overridden = sorted(set(self.model_config_overrides or {}) & {"rope_scaling", "rope_parameters", "rope_theta"})
        if overridden and (self.rope_scaling is not None or self.rope_theta is not None):
            problems.append(f"rope_scaling/rope_theta and model_config: {{{', '.join(overridden)}}} both set RoPE: "
                            "set it in one place")  # fmt: skip
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            factor = self.rope_scaling.get("factor")
            if kind not in ROPE_TYPES:
                problems.append(f"rope_scaling: rope_type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
            elif kind in ROPE_TYPES_WITH_FACTOR and (not isinstance(factor, (int, float)) or factor < 1):
                problems.append(f"rope_scaling: rope_type {kind} needs a factor of 1 or more (how many times the "
                                f"trained positions to reach), got {factor!r}")  # fmt: skip
        return problems

    def _memory_mode_problems(self) -> list[str]:
        problems = []
        if self.activation_offloading is True and not self.gradient_checkpointing:
            problems.append("activation_offloading: true keeps the checkpointed layers' inputs in CPU memory: set "
                            "gradient_checkpointing: true (or auto)")  # fmt: skip
        if self.tiled_mlp_num_shards is not None and self.tiled_mlp is False:
            problems.append("tiled_mlp_num_shards sets the chunks of the tiled MLP: set tiled_mlp: true (or auto), "
                            "or remove tiled_mlp_num_shards")  # fmt: skip
        problems.extend(self.tiled_mlp_problems())
        fixed_micro = self.micro_batch_size != "auto"
        if self.batch_size is not None and fixed_micro and self.batch_size != self.micro_batch_size * (
            self.gradient_accumulation_steps
        ):
            problems.append(f"batch_size: {self.batch_size} is not micro_batch_size x gradient_accumulation_steps "
                            f"({self.micro_batch_size} x {self.gradient_accumulation_steps}): set one of them, or "
                            "micro_batch_size: auto")  # fmt: skip
        if self.fp8 and (self.adapter or self.load_in_4bit or self.load_in_8bit):
            problems.append("fp8: true converts the trained linear layers to float8 training: full fine-tuning only "
                            "(remove adapter, or fp8)")  # fmt: skip
        if self.optimizer_in_backward:
            why = "optimizer_in_backward updates each parameter as soon as its gradient exists"
            if self.gradient_accumulation_steps > 1 or (self.batch_size is not None and not fixed_micro):
                problems.append(f"{why}, so gradients cannot accumulate: set gradient_accumulation_steps: 1 and no "
                                "batch_size (raise micro_batch_size instead)")  # fmt: skip
            if self.max_grad_norm:
                problems.append(f"{why}, before the global gradient norm is known: set max_grad_norm: 0")
            if self.deepspeed or self.fsdp:
                problems.append(f"{why}: it is a single-GPU mode; remove deepspeed/fsdp")
            if self.fp16:
                problems.append(f"fp16: true with optimizer_in_backward: fp16 scales the loss and unscales (and checks "
                                f"for inf) only at the optimizer step, but {why}, from the scaled gradient: use bf16 "
                                "(or float16, which scales nothing)")  # fmt: skip
            if self.optimizer not in IN_BACKWARD_OPTIMIZERS:
                problems.append(f"optimizer_in_backward with optimizer: {self.optimizer}: use one of "
                                f"{', '.join(IN_BACKWARD_OPTIMIZERS)}")  # fmt: skip
        return problems

    def tiled_mlp_problems(self) -> list[str]:
        """What `tiled_mlp: true` cannot run with (also read by the plan's `auto`, which tries it only where
        it can)."""
        problems: list[str] = []
        if self.tiled_mlp is True and self.liger_kernel_config.get("swiglu"):
            problems.append("tiled_mlp: true and liger_glu_activation: true (or flash_attn_fuse_mlp) both "
                            "replace the gated MLP's forward, and only one can run: keep one (the tiled MLP "
                            "already keeps only a chunk's intermediates)")  # fmt: skip
        if self.tiled_mlp is True and self.fsdp_version_in_use == 1:
            # FSDP1 runs the MLP on views of its flat parameter, not on the module's parameters: the tiled MLP
            # would compute no weight gradients there (model/tiled_mlp.py).
            problems.append("tiled_mlp with FSDP1 (fsdp_version: 1): FSDP1 computes with views of its flat "
                            "parameter, which the tiled MLP cannot take gradients for: use FSDP2 (fsdp_version: 2, "
                            "the default) or DeepSpeed ZeRO-3, or set tiled_mlp: false")  # fmt: skip
        return problems

    def _context_parallel_problems(self) -> list[str]:
        old, new = self.sequence_parallel_degree, self.context_parallel_size
        if old is not None and new != 1 and old != new:
            return [f"context_parallel_size: {new} and sequence_parallel_degree: {old} (its former name) disagree: "
                    "set one"]  # fmt: skip
        if self.cp_size == 1:
            return []
        clashes = [name for name, on in (("gemma4_hybrid_attn_impl", self.gemma4_hybrid_attn_impl),
                                         ("flex attention", self.attention_backend == "flex_attention"),
                                         ("lisa_n_layers", self.lisa_n_layers),
                                         ("optimizer_in_backward", self.optimizer_in_backward)) if on]  # fmt: skip
        return [f"context_parallel_size: {self.cp_size} with {name}: not supported (context parallelism runs "
                "attention through our variable-length entry point, over several processes)" for name in clashes]
