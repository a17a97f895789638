"""Fused LoRA computation: axolotl's `lora_mlp_kernel`, `lora_qkv_kernel` and `lora_o_kernel`.

Why our own: peft computes each LoRA projection as `base(x) + B(A(dropout(x))) * scale` out of separate
modules, and autograd keeps whatever each of them needs. In a gated MLP (`down(act(gate(x)) * up(x))`,
Llama, Mistral, Qwen, Gemma) of LoRA projections that is four intermediate-sized tensors per token: the gate
and up projections, the activation of the gate, and their product (the input of the down projection's
LoRA). `FusedLoRAGatedMLP` runs the whole MLP as one autograd node that keeps the input, the gate and up
projections and the rank-sized LoRA intermediates, and recomputes the activation and the product in its
backward pass (elementwise work): half the MLP's saved activations, with the same values and gradients.
`FusedLoRAProjection` does the same for one projection (q, k, v, o): base and LoRA in one node, keeping
the input as it came (peft, outside autocast, keeps a float32 copy of it for LoRA's float32 weights) and
the rank-sized x·Aᵀ. A 4-bit base weight is dequantised for the product in both passes, as bitsandbytes'
own 4-bit matmul does.

axolotl reaches the same place with Triton kernels and by rewriting the attention code of known models.
Here the layers' own classes get a subclass whose forward calls the fused function (peft and transformers
have no hook to choose a layer's computation; `isinstance` checks and parameter names stay as they were),
and each layer falls back to its class's own forward whenever the fused one would not compute the same
thing: adapters disabled or merged, several adapters, dropout, DoRA or other LoRA variants, a trained base
weight. `use_fused_lora` checks the fused MLP against the model's own on a random input before training.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from dolphin_train.errors import EnvironmentProblem
from dolphin_train.model.layers import decoder_layers
from dolphin_train.model.quantised import dequantized, is_4bit, is_8bit

log = logging.getLogger(__name__)

QKV_NAMES = ("q_proj", "k_proj", "v_proj")
O_NAMES = ("o_proj",)
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")  # the plan traces on "meta", where autocast has no meaning


# ---- one projection's arithmetic ---------------------------------------------------------------------------


def _lora_layer_class() -> type:
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


def fusable(layer: torch.nn.Module) -> bool:
    """True when `layer` is a peft LoRA layer whose output is exactly base(x) + scale·B·A·x, base frozen."""
    if not isinstance(layer, _lora_layer_class()):
        return False
    names = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(names) != 1 or names[0] not in layer.lora_A:
        return False
    name = names[0]
    plain = (isinstance(layer.lora_dropout[name], torch.nn.Identity) and name not in layer.lora_variant
             and layer.lora_B[name].bias is None)  # fmt: skip
    base = layer.get_base_layer()
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    return plain and frozen and not is_8bit(base.weight)


def projection_parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, Any, Any, float]:
    """(base layer, LoRA A weight, LoRA B weight, scale) of a fusable layer; (layer, None, None, 0) for a
    plain frozen linear layer."""
    if not isinstance(layer, _lora_layer_class()):
        return layer, None, None, 0.0
    name = layer.active_adapters[0]
    return layer.get_base_layer(), layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def _base_dtype(base: torch.nn.Module) -> torch.dtype:
    """The dtype the base layer multiplies in: a bitsandbytes 4-bit layer's compute dtype, else its weight's."""
    weight = base.weight
    return (base.compute_dtype or weight.quant_state.dtype) if is_4bit(weight) else weight.dtype


def _base_weight(base: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as it multiplies: dequantised when it is a bitsandbytes 4-bit weight."""
    return dequantized(base.weight).to(_base_dtype(base)) if is_4bit(base.weight) else base.weight


def _dtypes(x: torch.Tensor, base: torch.nn.Module, a: torch.Tensor | None) -> tuple[torch.dtype, torch.dtype]:
    """(base product dtype, LoRA product dtype): autocast's when it is on; else the base weight's, and LoRA's
    own weights' (peft casts the input to them)."""
    if x.device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype, dtype
    return _base_dtype(base), (a.dtype if a is not None else _base_dtype(base))


def _forward(x: torch.Tensor, base: torch.nn.Module, a: Any, b: Any, scale: float,
             dtypes: tuple[torch.dtype, torch.dtype]) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """(projection in the base dtype, x·Aᵀ or None)."""
    bias = base.bias.to(dtypes[0]) if base.bias is not None else None
    out = F.linear(x.to(dtypes[0]), _base_weight(base).to(dtypes[0]), bias)
    if a is None:
        return out, None
    xa = F.linear(x.to(dtypes[1]), a.to(dtypes[1]))
    return out + (F.linear(xa, b.to(dtypes[1])) * scale).to(out.dtype), xa


def _backward(grad: torch.Tensor, x: torch.Tensor, xa: Any, base: torch.nn.Module, a: Any, b: Any, scale: float,
              dtypes: tuple[torch.dtype, torch.dtype]) -> tuple[torch.Tensor, Any, Any]:  # fmt: skip
    """(gradient of the input, of A, of B) for the gradient `grad` of one projection's output."""
    grad_x = grad.to(dtypes[0]) @ _base_weight(base).to(dtypes[0])
    if a is None:
        return grad_x, None, None
    g = grad.to(dtypes[1]).reshape(-1, grad.shape[-1])
    grad_xa = (g @ b.to(dtypes[1])) * scale
    grad_b = (g.t() @ xa.reshape(-1, xa.shape[-1])) * scale
    grad_a = grad_xa.t() @ x.to(dtypes[1]).reshape(-1, x.shape[-1])
    grad_x = grad_x + (grad_xa @ a.to(dtypes[1])).reshape(grad_x.shape).to(grad_x.dtype)
    return grad_x, grad_a.to(a.dtype), grad_b.to(b.dtype)


class FusedLoRAProjection(torch.autograd.Function):
    """base(x) + scale·B·A·x in one node that keeps x and x·Aᵀ."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.nn.Module,
                scale: float) -> torch.Tensor:  # fmt: skip
        dtypes = _dtypes(x, base, a)
        out, xa = _forward(x, base, a, b, scale, dtypes)
        ctx.save_for_backward(x, xa, a, b)
        ctx.base, ctx.scale, ctx.dtypes = base, scale, dtypes
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, xa, a, b = ctx.saved_tensors
        grad_x, grad_a, grad_b = _backward(grad, x, xa, ctx.base, a, b, ctx.scale, ctx.dtypes)
        return grad_x.to(x.dtype), grad_a, grad_b, None, None


class FusedLoRAGatedMLP(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) of LoRA (or frozen) projections in one node that keeps x, gate(x), up(x)
    and the rank-sized LoRA intermediates; act(gate) and the product are recomputed in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, act: Any, parts: tuple, *lora: Any) -> torch.Tensor:
        (g_base, _, _, g_scale), (u_base, _, _, u_scale), (d_base, _, _, d_scale) = parts
        ga, gb, ua, ub, da, db = lora
        g_types, u_types, d_types = _dtypes(x, g_base, ga), _dtypes(x, u_base, ua), _dtypes(x, d_base, da)
        gate, xa_g = _forward(x, g_base, ga, gb, g_scale, g_types)
        up, xa_u = _forward(x, u_base, ua, ub, u_scale, u_types)
        hidden = act(gate) * up
        out, ha_d = _forward(hidden, d_base, da, db, d_scale, d_types)
        ctx.save_for_backward(x, gate, up, xa_g, xa_u, ha_d, *lora)
        ctx.act, ctx.parts, ctx.types = act, parts, (g_types, u_types, d_types)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, gate, up, xa_g, xa_u, ha_d, ga, gb, ua, ub, da, db = ctx.saved_tensors
        (g_base, _, _, g_scale), (u_base, _, _, u_scale), (d_base, _, _, d_scale) = ctx.parts
        g_types, u_types, d_types = ctx.types
        with torch.enable_grad():  # the activation's derivative, whatever the activation (SiLU, GELU...)
            gate_leaf = gate.detach().requires_grad_()
            activated = ctx.act(gate_leaf)
        hidden = activated.detach() * up
        grad_hidden, grad_da, grad_db = _backward(grad, hidden, ha_d, d_base, da, db, d_scale, d_types)
        grad_hidden = grad_hidden.to(up.dtype)
        (grad_gate,) = torch.autograd.grad(activated, gate_leaf, grad_hidden * up)
        grad_up = grad_hidden * activated.detach()
        grad_x, grad_ga, grad_gb = _backward(grad_gate, x, xa_g, g_base, ga, gb, g_scale, g_types)
        grad_x_up, grad_ua, grad_ub = _backward(grad_up, x, xa_u, u_base, ua, ub, u_scale, u_types)
        grad_x = (grad_x + grad_x_up).to(x.dtype)
        return grad_x, None, None, grad_ga, grad_gb, grad_ua, grad_ub, grad_da, grad_db


# ---- the layers' classes -----------------------------------------------------------------------------------


@cache
def fused_projection_class(cls: type) -> type:
    """`cls` (a peft LoRA linear class) with the fused forward where it computes the same thing."""

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not fusable(self):
            return cls.forward(self, x, *args, **kwargs)
        base, a, b, scale = projection_parts(self)
        return FusedLoRAProjection.apply(x, a, b, base, scale)

    return type("Fused" + cls.__name__, (cls,), {"forward": forward, "__module__": __name__})


def _mlp_projections_fusable(mlp: torch.nn.Module) -> bool:
    projections = [getattr(mlp, name) for name in MLP_NAMES]
    if not any(isinstance(p, _lora_layer_class()) for p in projections):
        return False
    for p in projections:
        if isinstance(p, _lora_layer_class()):
            if not fusable(p):
                return False
        elif not isinstance(p, torch.nn.Linear) or p.weight.requires_grad or is_8bit(p.weight):
            return False
    return True


def fused_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    parts = tuple(projection_parts(getattr(mlp, name)) for name in MLP_NAMES)
    lora = [t for _, a, b, _ in parts for t in (a, b)]
    return FusedLoRAGatedMLP.apply(x, mlp.act_fn, parts, *lora)


@cache
def fused_mlp_class(cls: type) -> type:
    """`cls` (a transformers gated MLP) with the fused forward while its projections allow it."""

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not _mlp_projections_fusable(self):
            return cls.forward(self, x, *args, **kwargs)
        return fused_mlp_forward(self, x)

    return type("Fused" + cls.__name__, (cls,), {"forward": forward, "__module__": __name__})


# ---- applying it -------------------------------------------------------------------------------------------


def _attention(layer: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(layer, "self_attn", None) or getattr(layer, "attention", None)


def _swap_projections(layers: list[torch.nn.Module], names: tuple[str, ...], key: str) -> int:
    swapped = 0
    for layer in layers:
        attention = _attention(layer)
        for name in names:
            module = getattr(attention, name, None) if attention is not None else None
            if isinstance(module, _lora_layer_class()) and isinstance(module.get_base_layer(), torch.nn.Linear):
                module.__class__ = fused_projection_class(type(module))
                swapped += 1
    if not swapped:
        raise EnvironmentProblem(f"{key}: this model's attention has no LoRA-adapted {'/'.join(names)} projection "
                                 "to fuse (add them to lora_target_modules, or set the key to false)")  # fmt: skip
    return swapped


def _swap_mlps(layers: list[torch.nn.Module]) -> int:
    swapped, checked = 0, set()
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in (*MLP_NAMES, "act_fn")):
            continue
        if _mlp_projections_fusable(mlp):
            if type(mlp) not in checked:  # what is checked is the class's computation: once per class
                _check_mlp_matches(mlp)
                checked.add(type(mlp))
            mlp.__class__ = fused_mlp_class(type(mlp))
            swapped += 1
    if not swapped:
        raise EnvironmentProblem("lora_mlp_kernel: this model has no gated MLP (gate_proj, up_proj, down_proj) "
                                 "with LoRA-adapted projections to fuse: set it to false")  # fmt: skip
    return swapped


def _check_mlp_matches(mlp: torch.nn.Module) -> None:
    """The fused MLP computes down(act(gate(x)) * up(x)); an MLP class that computes something else (other
    structure, dropout...) is refused here, before training, not trained wrongly."""
    base = projection_parts(mlp.gate_proj)[0]
    if base.weight.device.type == "meta":
        return  # the plan's model: nothing to compute with
    probe = torch.randn(1, 2, base.in_features, device=base.weight.device, dtype=_base_dtype(base))
    with torch.no_grad():
        expected, fused = type(mlp).forward(mlp, probe), fused_mlp_forward(mlp, probe)
    if not torch.allclose(expected.float(), fused.float(), rtol=2e-2, atol=2e-2 * expected.float().abs().max().item()):
        raise EnvironmentProblem(f"lora_mlp_kernel: {type(mlp).__name__} does not compute down(act(gate(x)) * up(x)) "
                                 "as the fused MLP does: set lora_mlp_kernel: false")  # fmt: skip


def use_fused_lora(model: Any, mlp: bool, qkv: bool, o: bool) -> Any:
    """Give the chosen LoRA-adapted layers of a peft model the fused forward (see the module docstring)."""
    if not (mlp or qkv or o):
        return model
    layers = decoder_layers(model)
    counts = {}
    if qkv:
        counts["q/k/v projections"] = _swap_projections(layers, QKV_NAMES, "lora_qkv_kernel")
    if o:
        counts["output projections"] = _swap_projections(layers, O_NAMES, "lora_o_kernel")
    if mlp:
        counts["MLPs"] = _swap_mlps(layers)
    log.info("Fused LoRA: %s", ", ".join(f"{n} {what}" for what, n in counts.items()))
    return model
