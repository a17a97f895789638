"""Per-device memory estimate of a training run, from the config and the model's shapes (no weights).

Why our own code: neither transformers nor accelerate estimates training memory for a given recipe.
The estimate follows what our trainer actually allocates:

- weights, gradients and optimizer states: counted parameter by parameter on a meta-device copy of
  the model built the way `model/load.py` builds it (load dtype, 4-/8-bit linear layers, the PEFT
  adapter and the embeddings it trains in full), then divided by what ZeRO or FSDP shards;
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

from dolphin_train.config.schema import Config
from dolphin_train.plan.trace import ActivationTrace, register_trace_attention, trace_activations

GiB = 2**30
CUDA_CONTEXT = int(0.6 * GiB)  # CUDA context, cuBLAS and kernels: outside PyTorch's allocator
NCCL_BUFFERS = int(0.5 * GiB)  # communicator buffers when several processes train together
FRAGMENTATION = 0.07  # reserved-but-unallocated share of PyTorch's caching allocator, typical in training
# On the CPU: the autograd graph, the Trainer's and the allocator's bookkeeping; measured as the constant
# part of the gap between these estimates and the peak resident memory of tiny runs (tests/test_plan.py).
CPU_RUNTIME = 80 * 2**20
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit block scales, float32 scale of scales
# Optimizer state bytes per trainable parameter as a multiple of the parameter's own bytes, or absolute.
STATE_MULTIPLE = {"adamw_torch": 2, "adamw_torch_fused": 2, "paged_adamw_32bit": 2, "adagrad": 1, "rmsprop": 1,
                  "lion_32bit": 1, "sgd": 0}  # fmt: skip
STATE_BYTES = {"adamw_8bit": 2, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2, "lion_8bit": 1}
# torchao's low-bit AdamW: bytes per value of each of its two states.
TORCHAO_STATE_BYTES = {"adamw_torch_4bit": 0.5, "adamw_torch_8bit": 1.0}
# The foreach (multi-tensor) Adam of PyTorch, used on CUDA, builds one full-size temporary per step.
FOREACH_OPTIMIZERS = {"adamw_torch"}


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16", "fp16" or "fp32"
    bytes: int

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


def plan_precision(cfg: Config, device: str) -> Precision:
    """`bf16: auto` means bf16 on any GPU this plan is for (Ampere or newer); on the CPU only if asked."""
    if cfg.bf16 is True or (cfg.bf16 == "auto" and device == "cuda"):
        return Precision("bf16", 2)
    if cfg.fp16 and device == "cuda":
        return Precision("fp16", 2)
    return Precision("fp32", 4)


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
    from dolphin_train.train.arguments import deepspeed_config

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
        options = " ".join(cfg.fsdp) if isinstance(cfg.fsdp, list) else str(cfg.fsdp)
        settings = {k.removeprefix("fsdp_"): v for k, v in (cfg.fsdp_config or {}).items()}
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


def _quantised(name: str, module: Any, cfg: Config) -> bool:
    """Linear layers bitsandbytes quantises: every nn.Linear but the output head."""
    import torch

    return (cfg.load_in_4bit or cfg.load_in_8bit) and isinstance(module, torch.nn.Linear) and "lm_head" not in name


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
        return param.numel() * STATE_BYTES[name] * (4 if _bnb_keeps_32bit_states(param, sharding, is_embedding) else 1)
    return param_bytes * STATE_MULTIPLE.get(name, 2)


def _bnb_keeps_32bit_states(param: Any, sharding: Sharding, is_embedding: bool) -> bool:
    """bitsandbytes' 8-bit optimizers keep 32-bit states for small tensors (under 4096 values), and the
    Trainer asks for 32-bit states on every nn.Embedding weight. Both are decided per tensor the optimizer
    sees, so neither applies under DeepSpeed, whose optimizer steps large flattened float32 partitions.
    Without the embedding rule the Llama-3-8B QLoRA estimate with added tokens was 9% low on an H100."""
    if sharding.deepspeed_stage is not None:
        return False
    return param.numel() < 4096 or is_embedding


def inventory(model: Any, cfg: Config, sharding: Sharding, precision: Precision, autocast: bool) -> ParameterInventory:
    import torch

    from dolphin_train.plan.trace import decoder_layers

    layers = decoder_layers(model.get_decoder() if hasattr(model, "get_decoder") else model)
    layer_ids = {id(p) for p in layers[0].parameters()}
    quantised_ids: set[int] = set()
    for name, module in model.named_modules():
        if _quantised(name, module, cfg):
            quantised_ids.add(id(module.weight))
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = trainable = weight_bytes = trainable_bytes = largest = largest_n = states = copies = 0
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_copy = layer_copy = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        if id(param) in quantised_ids:
            weight_bytes += int(n * (NF4_BYTES_PER_PARAM if cfg.load_in_4bit else 1.0))
        else:
            weight_bytes += n * param.element_size()
        if param.requires_grad:
            size = n * param.element_size()
            trainable += n
            trainable_bytes += size
            largest, largest_n = max(largest, size), max(largest_n, n)
            states += _state_bytes(cfg, param, size, sharding, id(param) in embedding_ids)
        if autocast and param.requires_grad and param.dim() >= 2 and param.element_size() > precision.bytes:
            copy = n * precision.bytes
            copies += copy
            head_copy += copy if id(param) in head_ids else 0
            layer_copy += copy if id(param) in layer_ids else 0
    embeddings = model.get_input_embeddings().weight
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
    precision: Precision
    chunked_loss: bool
    notes: tuple[str, ...] = ()

    @property
    def allocated(self) -> int:
        """What PyTorch's allocator holds at the peak (torch.cuda.max_memory_allocated on a GPU)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.transient

    @property
    def total(self) -> int:
        return self.allocated + self.overhead


def _model_dtype(cfg: Config, precision: Precision) -> Any:
    """The dtype `model/load.py` loads in: float32 master weights for full fine-tuning without
    DeepSpeed (autocast does the 16-bit compute), the compute dtype otherwise."""
    import torch

    if cfg.bfloat16:
        return torch.bfloat16
    if cfg.adapter or cfg.deepspeed:
        return precision.torch_dtype
    return torch.float32


def uses_autocast(cfg: Config, precision: Precision) -> bool:
    """Trainer autocasts in mixed precision except under DeepSpeed, which converts the model itself."""
    return precision.name != "fp32" and not cfg.deepspeed


def build_meta_model(cfg: Config, model_config: Any, vocab_rows: int, new_tokens: bool, precision: Precision) -> Any:
    """The model as training sees it, on the meta device: no memory, no weights, same parameters."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    config.vocab_size = max(int(config.vocab_size), vocab_rows)
    dtype = _model_dtype(cfg, precision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=register_trace_attention(), trust_remote_code=cfg.trust_remote_code
        )
    model.train()
    if cfg.adapter:
        model = _with_meta_adapter(cfg, model, new_tokens)
    from dolphin_train.model.load import freeze_except

    freeze_except(cfg, model)
    return model


def _with_meta_adapter(cfg: Config, model: Any, new_tokens: bool) -> Any:
    """The adapter exactly as `model/adapters.py` configures it; k-bit preparation done by hand, because
    on the meta device there are no 4-bit tensors for peft to recognise."""
    import torch
    from peft import get_peft_model

    from dolphin_train.model.adapters import lora_config, modules_to_save

    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.load_in_4bit or cfg.load_in_8bit:
        # peft's k-bit preparation keeps only the quantised weights in low precision: norms, embeddings
        # and the head go to float32 (the quantised layers are sized separately in `inventory`).
        quantised = {id(m.weight) for n, m in model.named_modules() if _quantised(n, m, cfg)}
        for param in model.parameters():
            if id(param) not in quantised and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
    saved = modules_to_save(cfg, model, [0] if new_tokens else [], announce=False)
    return get_peft_model(model, lora_config(cfg, model, saved))


def _logits_bytes(tokens: int, vocab: int, hidden: int, precision: Precision, chunked: bool):
    """(end of forward, start of backward) working memory of the output head and the loss."""
    from dolphin_train.train.loss import chunk_tokens_for

    if chunked:
        chunk = min(tokens, chunk_tokens_for(vocab)) * vocab
        # Selected hidden states of trained positions, and one chunk's logits in the backward pass.
        states = tokens * hidden * precision.bytes
        return states, states + chunk * (precision.bytes + 12)
    logits = tokens * vocab * precision.bytes
    upcast = 0 if precision.bytes == 4 else tokens * vocab * 4
    log_softmax = tokens * vocab * 4
    # Forward: logits, their float32 copy and the saved log-softmax; backward: the saved log-softmax,
    # its gradient and the gradient of the logits in float32, then cast back.
    return logits + upcast + log_softmax, log_softmax * 3


def estimate_memory(
    cfg: Config,
    model_config: Any,
    *,
    vocab_rows: int,
    new_tokens: bool,
    gpus: int,
    device: str = "cuda",
) -> MemoryEstimate:
    precision = plan_precision(cfg, device)
    sharding = plan_sharding(cfg, gpus)
    autocast = uses_autocast(cfg, precision)
    model = build_meta_model(cfg, model_config, vocab_rows, new_tokens, precision)
    params = inventory(model, cfg, sharding, precision, autocast)
    tokens = cfg.micro_batch_size * cfg.sequence_len
    trace = trace_activations(
        model, cfg.micro_batch_size, cfg.sequence_len, precision.torch_dtype if autocast else None
    )
    return _estimate(cfg, params, trace, sharding, precision, autocast, tokens, gpus, device)


def _number(value: Any, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) else default


def _estimate(
    cfg: Config,
    params: ParameterInventory,
    trace: ActivationTrace,
    sharding: Sharding,
    precision: Precision,
    autocast: bool,
    tokens: int,
    gpus: int,
    device: str,
) -> MemoryEstimate:
    from dolphin_train.train.loss import use_chunked_cross_entropy

    notes: list[str] = []
    ckpt = cfg.gradient_checkpointing
    zero = sharding.deepspeed_stage
    # --- weights: the stored parameters, sharded, plus ZeRO-3/FSDP's gathered layers in the compute dtype.
    weights = 0 if sharding.offload_params else params.weight_bytes // sharding.weights
    gathered = 0
    if sharding.weights > 1:
        # The layer being computed and the next one prefetched, plus the embeddings when they are used.
        gathered = 2 * max(params.largest_layer_params, params.embedding_params) * precision.bytes
    # --- gradients: same dtype as the trainable parameters; DeepSpeed reduces 16-bit gradients into a
    # float32 partition at the step.
    if zero is not None:
        grads = params.trainable * precision.bytes // sharding.gradients
        # Float32 gradients of one optimizer sub-group at a time (`sub_group_size` parameters; 0: one tensor).
        largest = params.largest_trainable_params
        sub_group = _number(sharding.settings.get("sub_group_size"), 1_000_000_000)
        partition = params.trainable // sharding.optimizer
        step_grads = (
            0 if sharding.offload_optimizer else 4 * min(partition, max(sub_group, largest // sharding.optimizer))
        )
    else:
        grads = params.trainable_bytes // sharding.gradients
        step_grads = 0
    # --- optimizer: states, and DeepSpeed's float32 master weights.
    if sharding.offload_optimizer:
        optimizer = 0
        notes.append("optimizer states and float32 master weights live in CPU memory (offload)")
    else:
        master = params.trainable * 4 // sharding.optimizer if zero is not None else 0
        optimizer = params.state_bytes // sharding.optimizer + master
    # --- activations (one micro-batch) and the autocast weight copies they hold on to.
    copies_full = params.autocast_copy_bytes - params.head_copy_bytes
    without = trace.saved(False) + (copies_full if autocast else 0)
    with_ckpt = trace.saved(True)
    activations = with_ckpt if ckpt else without
    recompute = trace.largest_layer + (params.autocast_copy_largest_layer if autocast else 0) if ckpt else 0
    chunked = use_chunked_cross_entropy(cfg, params.vocab_size)
    logits_fwd, logits_bwd = _logits_bytes(tokens, params.vocab_size, params.hidden_size, precision, chunked)
    head_copy = params.head_copy_bytes if autocast else 0
    # --- short-lived: the optimizer step's temporaries; DDP's gradient buckets.
    step = 0
    if cfg.optimizer in FOREACH_OPTIMIZERS and device == "cuda" and zero is None:
        step = params.state_bytes // 2 // sharding.optimizer  # one state-sized temporary
    elif cfg.optimizer in STATE_BYTES and device == "cpu":
        # bitsandbytes' CPU path updates a tensor's 8-bit states through float32 temporaries (~5 copies).
        step = params.largest_trainable_params * 4 * 5
    elif zero is None:
        step = params.largest_trainable_bytes * 2  # PyTorch's per-tensor loop: temporaries of one tensor
    ddp_buckets = params.trainable_bytes if gpus > 1 and zero is None and not cfg.fsdp else 0
    accumulating = cfg.gradient_accumulation_steps > 1
    held_grads = grads if accumulating else 0
    moments = {
        "end of forward": activations + head_copy + logits_fwd + held_grads + gathered,
        "start of backward": activations + head_copy + logits_bwd + held_grads + gathered + recompute,
        "end of backward": grads + ddp_buckets + gathered + recompute + trace.hidden_bytes * 2,
        "optimizer step": grads + ddp_buckets + step_grads + step,
    }
    moment = max(moments, key=moments.__getitem__)
    fixed = weights + optimizer
    peak_extra = moments[moment]
    # Split the peak into the named parts.
    part_grads = grads if moment in ("end of backward", "optimizer step") or accumulating else 0
    part_acts = activations + head_copy if moment in ("end of forward", "start of backward") else 0
    part_logits = {"end of forward": logits_fwd, "start of backward": logits_bwd}.get(moment, 0)
    transient = peak_extra - part_grads - part_acts - part_logits
    allocated = fixed + peak_extra
    overhead = CPU_RUNTIME
    if device == "cuda":
        overhead = CUDA_CONTEXT + (NCCL_BUFFERS if gpus > 1 else 0) + int(FRAGMENTATION * allocated)
    if cfg.optimizer.startswith("paged_"):
        notes.append("paged optimizer: its states can move to CPU memory under pressure")
    return MemoryEstimate(
        weights=weights,
        gradients=part_grads,
        optimizer=optimizer,
        activations=part_acts,
        logits=part_logits,
        transient=transient,
        overhead=overhead,
        peak_moment=moment,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_ckpt,
        params=params,
        sharding=sharding,
        precision=precision,
        chunked_loss=chunked,
        notes=tuple(notes),
    )
