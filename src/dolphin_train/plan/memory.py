"""Per-device memory estimate of a training run, from the config and the model's shapes (no weights).

Why our own code: neither transformers nor accelerate estimates training memory for a given recipe.
The estimate follows what our trainer actually allocates:

- weights, gradients and optimizer states: counted parameter by parameter on a meta-device copy of
  the model built by the functions training calls (`skeleton.py`: load dtype, 4-/8-bit linear layers,
  k-bit preparation, the PEFT adapter and what it trains in full), then divided by what ZeRO or FSDP shards;
- activations: measured by tracing the model's forward pass on the meta device (`trace.py`), with
  gradient checkpointing keeping only each layer's input plus one layer recomputed in the backward pass;
- logits and loss: the output head's logits and the float32 cross-entropy working memory, or one chunk
  of them with chunked cross-entropy;
- the peak is the largest of four moments of a step (end of forward, start of backward, end of
  backward, optimizer step), because gradients are freed between steps and optimizer states appear at
  the first step; on a GPU, CUDA context and allocator fragmentation come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.model.adapters import compute_dtype
from dolphin_train.model.layers import decoder_layers
from dolphin_train.model.load import load_dtype
from dolphin_train.plan.skeleton import build_meta_model, make_computable_on_meta
from dolphin_train.plan.trace import ActivationTrace, trace_activations
from dolphin_train.train.arguments import deepspeed_config, fsdp_options, fsdp_settings, trainer_autocasts
from dolphin_train.train.loss import chunk_tokens_for, use_chunked_cross_entropy

GiB = 2**30
CUDA_CONTEXT = int(0.6 * GiB)  # CUDA context, cuBLAS and kernels: outside PyTorch's allocator
NCCL_BUFFERS = int(0.5 * GiB)  # communicator buffers when several processes train together
FRAGMENTATION = 0.07  # reserved-but-unallocated share of PyTorch's caching allocator, typical in training
# On the CPU: the autograd graph, the Trainer's and the allocator's bookkeeping; measured as the constant
# part of the gap between these estimates and the peak resident memory of tiny runs (tests/test_plan.py).
CPU_RUNTIME = 80 * 2**20
NF4_BLOCK = 64  # values per bitsandbytes 4-bit block (its absmax scale)
DOUBLE_QUANT_BLOCK = 256  # block scales per float32 second-level scale, with double quantisation
INT8_BYTES_PER_PARAM = 1.0
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Optimizer state bytes per trainable parameter as a multiple of the parameter's own bytes, or absolute.
STATE_MULTIPLE = {"adamw_torch": 2, "adamw_torch_fused": 2, "paged_adamw_32bit": 2, "adagrad": 1, "rmsprop": 1,
                  "lion_32bit": 1, "sgd": 0}  # fmt: skip
STATE_BYTES = {"adamw_8bit": 2, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2, "lion_8bit": 1}
# torchao's low-bit AdamW: bytes per value of each of its two states.
TORCHAO_STATE_BYTES = {"adamw_torch_4bit": 0.5, "adamw_torch_8bit": 1.0}
# The foreach (multi-tensor) Adam of PyTorch, used on CUDA, builds one full-size temporary per step.
FOREACH_OPTIMIZERS = {"adamw_torch"}



@dataclass(frozen=True)
class Sharding:
    """How many ways weights, gradients and optimizer states are split, and what lives off the GPU."""

    name: str
    weights: int = 1
    gradients: int = 1
    optimizer: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed_stage: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _deepspeed_settings(cfg: Config) -> dict[str, Any]:
    settings = deepspeed_config(cfg)  # a mapping, or a path checked to exist
    return settings if isinstance(settings, dict) else json.loads(Path(settings).read_text())


def plan_sharding(cfg: Config, gpus: int) -> Sharding:
    if cfg.deepspeed:
        zero = _deepspeed_settings(cfg).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
        offload_par = stage == 3 and (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
        return Sharding(
            name=f"DeepSpeed ZeRO-{stage}"
            + (" + optimizer offload" if offload_opt else "")
            + (" + parameter offload" if offload_par else ""),
            weights=gpus if stage >= 3 else 1,
            gradients=gpus if stage >= 2 else 1,
            optimizer=gpus if stage >= 1 else 1,
            offload_optimizer=offload_opt,
            offload_params=offload_par,
            deepspeed_stage=stage,
            settings=zero,
        )
    if cfg.fsdp:
        options = " ".join(fsdp_options(cfg))
        settings = fsdp_settings(cfg) or {}
        strategy = str(settings.get("sharding_strategy", "FULL_SHARD" if "full_shard" in options else options))
        full = "full_shard" in options or "FULL_SHARD" in strategy.upper() or settings.get("reshard_after_forward")
        offload = "offload" in options or bool(settings.get("offload_params"))
        return Sharding(
            name="FSDP " + ("full shard" if full else "shard grad+optimizer") + (" + CPU offload" if offload else ""),
            weights=gpus if full else 1,
            gradients=gpus,
            optimizer=gpus,
            offload_optimizer=offload,
            offload_params=offload,
        )
    return Sharding(name="DDP (each GPU holds everything)" if gpus > 1 else "none")


@dataclass(frozen=True)
class ParameterInventory:
    total: int
    trainable: int
    weight_bytes: int  # as stored for training (quantised layers at their packed size)
    trainable_bytes: int  # bytes of the trainable parameters themselves (their gradients' size)
    largest_trainable_bytes: int
    largest_trainable_params: int
    largest_layer_params: int  # one decoder layer, for ZeRO-3 / FSDP gathers
    embedding_params: int
    layers: int
    hidden_size: int
    vocab_size: int
    state_bytes: int  # optimizer states
    autocast_copy_bytes: int  # 16-bit copies of float32 weights that autocast keeps for the backward pass
    autocast_copy_largest_layer: int
    head_copy_bytes: int
    embeddings_trained: str = ""  # with an adapter: "rows" (of added tokens), "in full", "rows and in full" or ""
    relora_sum_bytes: int = 0  # ReLoRA's float32 merged weights (train/relora.py), wherever they are kept


def four_bit_bytes_per_param(double_quant: bool, block: int = NF4_BLOCK) -> float:
    """Bytes per value of a bitsandbytes 4-bit weight: the 4-bit codes and each block's scale, a float32, or
    with double quantisation (`bnb_4bit_use_double_quant`) an 8-bit code plus a float32 scale per
    `DOUBLE_QUANT_BLOCK` block scales."""
    if double_quant:
        return 0.5 + 1 / block + 4 / (block * DOUBLE_QUANT_BLOCK)
    return 0.5 + 4 / block


def _stored_bytes(param: Any) -> int:
    """Bytes of a weight as training stores it: bitsandbytes' quantised weights at their packed size (the
    parameter says whether its block scales are themselves quantised, and its block size)."""
    kind = type(param).__name__
    if kind == "Params4bit":
        double = bool(getattr(param, "compress_statistics", True))
        return int(param.numel() * four_bit_bytes_per_param(double, getattr(param, "blocksize", None) or NF4_BLOCK))
    if kind == "Int8Params":
        return int(param.numel() * INT8_BYTES_PER_PARAM)
    return param.numel() * param.element_size()


def _state_bytes(cfg: Config, param: Any, param_bytes: int, sharding: Sharding, is_embedding: bool) -> int:
    if sharding.deepspeed_stage is not None:
        # DeepSpeed steps the optimizer on its float32 master copy: states are sized from float32.
        param_bytes = param.numel() * 4
    name = cfg.optimizer
    if name in TORCHAO_STATE_BYTES:  # two low-bit states, a float32 scale per 128 values; float32 under 4096 values
        return (
            int(param.numel() * 2 * (TORCHAO_STATE_BYTES[name] + 4 / 128))
            if param.numel() >= 4096
            else param.numel() * 8
        )
    if name == "adafactor":
        return (sum(param.shape[-2:]) if param.dim() >= 2 else param.numel()) * 4
    if name in STATE_BYTES:
        wide = _bnb_keeps_32bit_states(param, sharding, is_embedding and not cfg.optimizer_in_backward)
        return param.numel() * STATE_BYTES[name] * (4 if wide else 1)
    return param_bytes * STATE_MULTIPLE.get(name, 2)


def _bnb_keeps_32bit_states(param: Any, sharding: Sharding, is_embedding: bool) -> bool:
    """bitsandbytes' 8-bit optimizers keep 32-bit states for small tensors (under 4096 values), and the
    Trainer asks for 32-bit states on every nn.Embedding weight (not the per-parameter optimizers of
    `optimizer_in_backward`, which we build). Both are decided per tensor the optimizer sees, so neither
    applies under DeepSpeed, whose optimizer steps large flattened float32 partitions. Without the embedding
    rule the Llama-3-8B QLoRA estimate with added tokens was 9% low on an H100."""
    if sharding.deepspeed_stage is not None:
        return False
    return param.numel() < 4096 or is_embedding


def inventory(model: Any, cfg: Config, sharding: Sharding, precision_bytes: int, autocast: bool) -> ParameterInventory:
    import torch

    layers = decoder_layers(model.get_decoder() if hasattr(model, "get_decoder") else model)
    layer_ids = {id(p) for p in layers[0].parameters()}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = trainable = weight_bytes = trainable_bytes = largest = largest_n = states = copies = 0
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_copy = layer_copy = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        weight_bytes += _stored_bytes(param)
        if param.requires_grad:
            size = n * param.element_size()
            trainable += n
            trainable_bytes += size
            largest, largest_n = max(largest, size), max(largest_n, n)
            states += _state_bytes(cfg, param, size, sharding, id(param) in embedding_ids)
        if autocast and param.requires_grad and param.dim() >= 2 and param.element_size() > precision_bytes:
            copy = n * precision_bytes
            copies += copy
            head_copy += copy if id(param) in head_ids else 0
            layer_copy += copy if id(param) in layer_ids else 0
    embeddings = model.get_input_embeddings().weight
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    relora_sums = 0
    if cfg.relora:
        from dolphin_train.train.relora import kept_sum_values

        relora_sums = 4 * kept_sum_values(model)
    rows, full = any("trainable_tokens_delta" in n for n in trained), any("modules_to_save" in n for n in trained)
    return ParameterInventory(
        total=total,
        trainable=trainable,
        weight_bytes=weight_bytes,
        trainable_bytes=trainable_bytes,
        largest_trainable_bytes=largest,
        largest_trainable_params=largest_n,
        largest_layer_params=sum(p.numel() for p in layers[0].parameters()),
        embedding_params=embeddings.numel(),
        layers=len(layers),
        hidden_size=embeddings.shape[1],
        vocab_size=embeddings.shape[0],
        state_bytes=states,
        autocast_copy_bytes=copies,
        autocast_copy_largest_layer=layer_copy,
        head_copy_bytes=head_copy,
        embeddings_trained=" and ".join(w for w, on in (("rows", rows), ("in full", full)) if on),
        relora_sum_bytes=relora_sums,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device at the step's peak, and where that peak falls."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    transient: int  # backward/optimizer working memory, ZeRO-3 or FSDP gathered layers, DDP buckets
    overhead: int  # CUDA context, communicator buffers, allocator fragmentation (0 on the CPU)
    peak_moment: str
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    params: ParameterInventory
    sharding: Sharding
    precision: str  # "bf16", "fp16" or "fp32"
    chunked_loss: bool
    notes: tuple[str, ...] = ()

    @property
    def allocated(self) -> int:
        """What PyTorch's allocator holds at the peak (torch.cuda.max_memory_allocated on a GPU)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.transient

    @property
    def total(self) -> int:
        return self.allocated + self.overhead


@dataclass(frozen=True)
class MemoryModel:
    """The parameters and the activations of one row of a config's model, measured once: the estimate for
    any micro-batch size, checkpointing or offloading of the same model and optimizer is then arithmetic
    (what `micro_batch_size: auto` and `gradient_checkpointing: auto` search over)."""

    runtime: RuntimeSettings
    params: ParameterInventory
    trace_per_row: ActivationTrace
    sharding: Sharding
    autocast: bool
    trace_tiled_per_row: ActivationTrace | None = None  # with the MLPs tiled, for `tiled_mlp: auto`

    def estimate(self, cfg: Config) -> MemoryEstimate:
        """`cfg` differs from the measured one only in batch, checkpointing, offloading and tiling settings."""
        per_row = self.trace_tiled_per_row if cfg.tiled_mlp is True and self.trace_tiled_per_row else self.trace_per_row
        trace = per_row.scaled(int(cfg.micro_batch_size))
        return _combine(cfg, self.runtime, self.params, trace, self.sharding, self.autocast)


@dataclass
class MeasurableModel:
    """The meta-device model of a config and its parameter inventory, built once and traced at any length
    (the plan's search for the longest context traces it many times)."""

    runtime: RuntimeSettings
    model: Any
    params: ParameterInventory
    sharding: Sharding
    autocast: bool
    compute: Any  # the compute dtype

    def trace(self, rows: int, sequence_len: int) -> ActivationTrace:
        return trace_activations(self.model, rows, sequence_len, self.compute if self.autocast else None)


def measurable_model(cfg: Config, runtime: RuntimeSettings, model_config: Any, *, vocab_rows: int,
                     new_token_ids: list[int]) -> MeasurableModel:  # fmt: skip
    sharding = plan_sharding(cfg, runtime.world_size)
    autocast = trainer_autocasts(cfg, runtime)
    precision_bytes = PRECISION_BYTES[matmul_precision(cfg, runtime)]
    model = build_meta_model(cfg, runtime, model_config, vocab_rows, new_token_ids)
    params = inventory(model, cfg, sharding, precision_bytes, autocast)
    compute = load_dtype(cfg, runtime) if cfg.float16 else compute_dtype(runtime)
    make_computable_on_meta(model, compute)
    if getattr(model, "is_activation_checkpointing", False):  # k-bit preparation may have turned it on
        model.activation_checkpointing_disable()  # the trace measures both ways itself
    return MeasurableModel(runtime, model, params, sharding, autocast, compute)


def memory_model_at(measurable: MeasurableModel, tiled: MeasurableModel | None, sequence_len: int) -> MemoryModel:
    """The MemoryModel of one row of `sequence_len` tokens (`tiled`: the same model with its MLPs tiled)."""
    m = measurable
    tiled_trace = tiled.trace(1, sequence_len) if tiled is not None else None
    return MemoryModel(m.runtime, m.params, m.trace(1, sequence_len), m.sharding, m.autocast, tiled_trace)


def tokens_per_device(cfg: Any) -> int:
    """A row's tokens on one device: with context parallelism (`context_parallel_size`, Ulysses-style), each
    of the group's processes holds a contiguous 1/N of them, and its activations are those of 1/N of the
    sequence (attention's all-to-all trades the sequence split for a split of the heads, same bytes)."""
    ways = cfg.cp_size
    return -(-cfg.sequence_len // ways)


def measure_model(
    cfg: Config,
    runtime: RuntimeSettings,
    model_config: Any,
    *,
    vocab_rows: int,
    new_token_ids: list[int],
    rows: int = 1,
) -> tuple[MemoryModel, ActivationTrace]:
    """Build the meta-device model and trace `rows` rows of `sequence_len` tokens (the MemoryModel keeps one);
    with `tiled_mlp: auto` also the model with its MLPs tiled."""
    facts = {"vocab_rows": vocab_rows, "new_token_ids": new_token_ids}
    measurable = measurable_model(cfg, runtime, model_config, **facts)
    tiled = None
    if cfg.tiled_mlp == "auto":
        tiled = measurable_model(cfg.model_copy(update={"tiled_mlp": True}), runtime, model_config, **facts)
    memory = memory_model_at(measurable, tiled, tokens_per_device(cfg))
    trace = memory.trace_per_row if rows == 1 else measurable.trace(rows, tokens_per_device(cfg))
    return memory, trace


def estimate_memory(
    cfg: Config, runtime: RuntimeSettings, model_config: Any, *, vocab_rows: int, new_token_ids: list[int]
) -> MemoryEstimate:
    """Per-device memory of `cfg` on the machine `runtime` describes (`resolve_runtime`, real or planned)."""
    rows = cfg.micro_batch_size if isinstance(cfg.micro_batch_size, int) else 1
    measured, trace = measure_model(cfg, runtime, model_config, vocab_rows=vocab_rows, new_token_ids=new_token_ids,
                                    rows=rows)  # fmt: skip
    return _combine(cfg, runtime, measured.params, trace, measured.sharding, measured.autocast)


# ---- one function per part of the memory, each per device --------------------------------------------


@dataclass(frozen=True)
class _Weights:
    stored: int  # the parameters as stored, sharded (0 when offloaded)
    gathered: int  # ZeRO-3 / FSDP: the layer computed and the one prefetched, in the compute dtype


def weights_part(cfg: Config, params: ParameterInventory, sharding: Sharding, precision_bytes: int) -> _Weights:
    stored = 0 if sharding.offload_params else params.weight_bytes // sharding.weights
    if not cfg.relora_cpu_offload:  # ReLoRA's sums, on the GPU from the first restart on
        stored += params.relora_sum_bytes
    gathered = 0
    if sharding.weights > 1:  # the embeddings are gathered whole when they are used
        gathered = 2 * max(params.largest_layer_params, params.embedding_params) * precision_bytes
    return _Weights(stored, gathered)


@dataclass(frozen=True)
class _Gradients:
    held: int  # the gradients of the trainable parameters, sharded
    step_partition: int  # DeepSpeed: float32 gradients of one optimizer sub-group during the step


def gradients_part(cfg: Config, params: ParameterInventory, sharding: Sharding, precision_bytes: int) -> _Gradients:
    if cfg.optimizer_in_backward:  # each gradient is freed once its parameter is updated: one at a time
        return _Gradients(params.largest_trainable_bytes, 0)
    if sharding.deepspeed_stage is None:
        return _Gradients(params.trainable_bytes // sharding.gradients, 0)
    # DeepSpeed reduces 16-bit gradients into a float32 partition at the step, one optimizer sub-group
    # (`sub_group_size` parameters; 0: one tensor) at a time.
    held = params.trainable * precision_bytes // sharding.gradients
    sub_group = _number(sharding.settings.get("sub_group_size"), 1_000_000_000)
    partition = params.trainable // sharding.optimizer
    largest = params.largest_trainable_params
    step = 0 if sharding.offload_optimizer else 4 * min(partition, max(sub_group, largest // sharding.optimizer))
    return _Gradients(held, step)


def optimizer_part(params: ParameterInventory, sharding: Sharding) -> int:
    """Optimizer states, and DeepSpeed's float32 master weights (0 on the GPU when offloaded)."""
    if sharding.offload_optimizer:
        return 0
    master = params.trainable * 4 // sharding.optimizer if sharding.deepspeed_stage is not None else 0
    return params.state_bytes // sharding.optimizer + master


@dataclass(frozen=True)
class _Activations:
    kept: int  # what the forward pass keeps on the device for the backward pass, with this config's settings
    without_checkpointing: int
    with_checkpointing: int
    recomputed: int  # checkpointing: the one layer recomputed at a time in the backward pass
    head_copy: int  # autocast's 16-bit copy of a float32 output head
    offloaded: int  # checkpointed layers' inputs kept in CPU memory instead (activation offloading)


def activations_part(cfg: Config, params: ParameterInventory, trace: ActivationTrace, autocast: bool,
                     device: str) -> _Activations:  # fmt: skip
    """What a micro-batch's forward pass keeps, with checkpointing of every N-th layer (0: none) and the
    checkpointed layers' inputs on the device or offloaded to CPU memory (on a GPU: a CPU run has them there
    already)."""
    every = cfg.gradient_checkpointing_layers if cfg.checkpointing else 0
    checkpointed = trace.checkpointed(every)
    copies = params.autocast_copy_bytes - params.head_copy_bytes if autocast else 0
    # autocast's 16-bit weight copies stay for the layers that are not recomputed
    kept_copies = copies * checkpointed.count(False) // max(1, len(checkpointed))
    offload = cfg.offloads_activations and every > 0 and device == "cuda"
    kept = trace.saved(every, offload) + kept_copies
    offloaded = sum(i for i, c in zip(trace.inputs, checkpointed, strict=True) if c) if offload else 0
    recomputed = 0
    if every:  # one layer recomputed at a time, with its input brought back from CPU memory when offloaded
        recomputed = trace.largest_layer + (params.autocast_copy_largest_layer if autocast else 0)
        recomputed += max(trace.inputs, default=0) if offload else 0
    head_copy = params.head_copy_bytes if autocast else 0
    return _Activations(kept, trace.saved(0) + copies, trace.saved(1), recomputed, head_copy, offloaded)


def logits_part(tokens: int, vocab: int, hidden: int, precision_bytes: int, chunked: bool) -> tuple[int, int]:
    """(end of forward, start of backward) working memory of the output head and the loss."""
    if chunked:
        chunk = min(tokens, chunk_tokens_for(vocab)) * vocab
        # Selected hidden states of trained positions, and one chunk's logits in the backward pass.
        states = tokens * hidden * precision_bytes
        return states, states + chunk * (precision_bytes + 12)
    logits = tokens * vocab * precision_bytes
    upcast = 0 if precision_bytes == 4 else tokens * vocab * 4
    log_softmax = tokens * vocab * 4
    # Forward: logits, their float32 copy and the saved log-softmax; backward: the saved log-softmax,
    # its gradient and the gradient of the logits in float32, then cast back.
    return logits + upcast + log_softmax, log_softmax * 3


@dataclass(frozen=True)
class _Working:
    step_temporaries: int  # the optimizer step's temporaries
    ddp_buckets: int  # DDP's gradient buckets


def working_memory_part(cfg: Config, params: ParameterInventory, sharding: Sharding, device: str,
                        gpus: int) -> _Working:  # fmt: skip
    zero = sharding.deepspeed_stage
    if cfg.optimizer_in_backward and device == "cuda":
        step = 0  # one parameter at a time, in fused kernels (torchao compiles its update; bitsandbytes' is one)
    elif cfg.optimizer_in_backward:
        step = params.largest_trainable_params * 4 * 5  # eager on the CPU: float32 copies of one parameter
    elif cfg.optimizer in FOREACH_OPTIMIZERS and device == "cuda" and zero is None:
        step = params.state_bytes // 2 // sharding.optimizer  # one state-sized temporary
    elif cfg.optimizer in STATE_BYTES and device == "cpu":
        # bitsandbytes' CPU path updates a tensor's 8-bit states through float32 temporaries (~5 copies).
        step = params.largest_trainable_params * 4 * 5
    elif zero is None:
        step = params.largest_trainable_bytes * 2  # PyTorch's per-tensor loop: temporaries of one tensor
    else:
        step = 0
    buckets = params.trainable_bytes if gpus > 1 and zero is None and not cfg.fsdp else 0
    return _Working(step, buckets)


def overhead_part(allocated: int, gpus: int, device: str) -> int:
    if device != "cuda":
        return CPU_RUNTIME
    return CUDA_CONTEXT + (NCCL_BUFFERS if gpus > 1 else 0) + int(FRAGMENTATION * allocated)


def _number(value: Any, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) else default


def matmul_precision(cfg: Config, runtime: RuntimeSettings) -> str:
    """The dtype of the matrix products: `float16` weights compute in float16 without mixed precision."""
    return "fp16" if cfg.float16 else runtime.precision


def _loss_then_layer(loss_backward: int, layer_backward: int, chunked: bool) -> int:
    """The loss's backward pass, then the last layer's (recomputed under checkpointing). The chunked loss frees
    its chunks and its selected hidden states before the layers' backward pass begins: one after the other.
    With the whole logits, the CPU runs of tests/test_plan.py measure them still held: both at once."""
    return max(loss_backward, layer_backward) if chunked else loss_backward + layer_backward


def _combine(cfg: Config, runtime: RuntimeSettings, params: ParameterInventory, trace: ActivationTrace,
             sharding: Sharding, autocast: bool) -> MemoryEstimate:  # fmt: skip
    """The parts at each of four moments of a step; the peak is the largest."""
    precision_bytes = PRECISION_BYTES[matmul_precision(cfg, runtime)]
    gpus = runtime.world_size
    weights = weights_part(cfg, params, sharding, precision_bytes)
    grads = gradients_part(cfg, params, sharding, precision_bytes)
    optimizer = optimizer_part(params, sharding)
    acts = activations_part(cfg, params, trace, autocast, runtime.device)
    chunked = use_chunked_cross_entropy(cfg, params.vocab_size)
    tokens = int(cfg.micro_batch_size) * tokens_per_device(cfg)
    logits_fwd, logits_bwd = logits_part(tokens, params.vocab_size, params.hidden_size, precision_bytes, chunked)
    work = working_memory_part(cfg, params, sharding, runtime.device, gpus)
    accumulating = cfg.gradient_accumulation_steps > 1
    held_grads = grads.held if accumulating else 0
    gathered, recomputed = weights.gathered, acts.recomputed
    moments = {
        "end of forward": acts.kept + acts.head_copy + logits_fwd + held_grads + gathered,
        "start of backward": acts.kept + acts.head_copy + held_grads + gathered
        + _loss_then_layer(logits_bwd, recomputed + trace.layer_backward, chunked),
        "end of backward": grads.held + work.ddp_buckets + gathered + recomputed + trace.hidden_bytes * 2,
        "optimizer step": grads.held + work.ddp_buckets + grads.step_partition + work.step_temporaries,
    }
    moment = max(moments, key=moments.__getitem__)
    part_grads = grads.held if moment in ("end of backward", "optimizer step") or accumulating else 0
    part_acts = acts.kept + acts.head_copy if moment in ("end of forward", "start of backward") else 0
    layer_first = chunked and recomputed + trace.layer_backward > logits_bwd
    part_logits = {"end of forward": logits_fwd, "start of backward": 0 if layer_first else logits_bwd}.get(moment, 0)
    transient = moments[moment] - part_grads - part_acts - part_logits
    allocated = weights.stored + optimizer + moments[moment]
    notes = []
    if acts.offloaded:
        notes.append(f"activation offloading: {acts.offloaded / GiB:.1f} GiB of checkpointed layer inputs in pinned "
                     "CPU memory")  # fmt: skip
    if sharding.offload_optimizer:
        notes.append("optimizer states and float32 master weights live in CPU memory (offload)")
    if cfg.optimizer.startswith("paged_"):
        notes.append("paged optimizer: its states can move to CPU memory under pressure")
    if params.relora_sum_bytes:
        where = "in CPU memory (relora_cpu_offload)" if cfg.relora_cpu_offload else "counted in the weights"
        notes.append(f"ReLoRA's float32 merged weights: {params.relora_sum_bytes / GiB:.1f} GiB, {where}")
    return MemoryEstimate(
        weights=weights.stored,
        gradients=part_grads,
        optimizer=optimizer,
        activations=part_acts,
        logits=part_logits,
        transient=transient,
        overhead=overhead_part(allocated, gpus, runtime.device),
        peak_moment=moment,
        activations_without_checkpointing=acts.without_checkpointing,
        activations_with_checkpointing=acts.with_checkpointing,
        params=params,
        sharding=sharding,
        precision=matmul_precision(cfg, runtime),
        chunked_loss=chunked,
        notes=tuple(notes),
    )
