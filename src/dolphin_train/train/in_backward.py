"""The optimizer step fused into the backward pass (`optimizer_in_backward: true`): each parameter is updated
as soon as its gradient is complete, and the gradient is freed at once, so full gradients are never held.

Why our own code: PyTorch gives the mechanism (`Tensor.register_post_accumulate_grad_hook`, as in its
tutorial on fusing the optimizer step into the backward pass) but no optimizer object the Trainer can
drive. This one is what the Trainer sees: its `step` and `zero_grad` do nothing (the work happened during
backward), its param group carries the learning rate the scheduler sets, and its state dict holds every
parameter's optimizer state, so checkpoints and resume work as with any optimizer. The updates themselves
are the libraries': torchao's low-bit AdamW (which rounds bf16 weights stochastically, so small updates are
not lost) or bitsandbytes' 8-bit AdamW, one instance per parameter.

Gradient clipping needs every gradient before the first update, and accumulation needs gradients held
across micro-batches: both are refused at config load with this mode.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

# Optimizer names (transformers') this mode supports, and whether they round bf16 weights stochastically.
STOCHASTIC_ROUNDING = {"adamw_torch_8bit": True, "adamw_torch_4bit": True, "adamw_8bit": False,
                       "adamw_bnb_8bit": False, "paged_adamw_8bit": False, "adamw_torch": False}  # fmt: skip
SUPPORTED = tuple(STOCHASTIC_ROUNDING)


def parameter_optimizer(name: str, lr: float, betas: tuple[float, float], eps: float) -> Callable[..., Any]:
    """A factory: (parameter, weight decay) -> that parameter's own optimizer."""

    def make(param: torch.nn.Parameter, weight_decay: float) -> torch.optim.Optimizer:
        kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        if name in ("adamw_torch_8bit", "adamw_torch_4bit"):
            from torchao.optim import AdamW4bit, AdamW8bit

            cls = AdamW8bit if name == "adamw_torch_8bit" else AdamW4bit
            return cls([param], bf16_stochastic_round=param.dtype == torch.bfloat16, **kwargs)
        if name in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
            import bitsandbytes as bnb

            return bnb.optim.AdamW([param], optim_bits=8, is_paged=name.startswith("paged_"), **kwargs)
        return torch.optim.AdamW([param], **kwargs)

    return make


class OptimizerInBackward(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[tuple[str, torch.nn.Parameter]],
        make: Callable[[torch.nn.Parameter, float], torch.optim.Optimizer],
        lr: float,
        weight_decay: float,
        decay_names: set[str],
        eager: bool = False,
    ) -> None:
        named = [(n, p) for n, p in params if p.requires_grad]
        super().__init__([{"params": [p for _, p in named], "lr": lr}], {"lr": lr})
        self.inner = [make(p, weight_decay if n in decay_names else 0.0) for n, p in named]
        self._by_parameter = {id(p): opt for (_, p), opt in zip(named, self.inner, strict=True)}
        # On the CPU, compiling each parameter's update (torchao does) costs more than it saves.
        self._eager = eager
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for _, p in named]

    @torch.no_grad()
    def _update(self, param: torch.nn.Parameter) -> None:
        optimizer = self._by_parameter[id(param)]
        lr = self.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)  # torchao keeps the rate as a tensor (no recompilation when it changes)
            else:
                group["lr"] = lr
        stance = torch.compiler.set_stance("force_eager") if self._eager else contextlib.nullcontext()
        with stance:
            optimizer.step()
        param.grad = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Nothing left to do: every parameter was updated during the backward pass."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: each gradient was freed right after its parameter's update."""

    def state_dict(self) -> dict[str, Any]:
        return {"param_groups": [{"lr": g["lr"]} for g in self.param_groups],
                "inner": [optimizer.state_dict() for optimizer in self.inner]}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group["lr"] = saved["lr"]
        for optimizer, saved in zip(self.inner, state_dict["inner"], strict=True):
            optimizer.load_state_dict(saved)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
