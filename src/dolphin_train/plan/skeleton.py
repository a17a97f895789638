"""The model as training builds it, on PyTorch's meta device: shapes and dtypes, no memory, no weights.

Built through the very functions training calls (`model/load.py`'s load dtype and config overrides,
`model/adapters.py`'s quantisation settings, k-bit preparation and LoRA adapter) and transformers' own
bitsandbytes quantizer, which swaps the linear layers for 4-/8-bit ones before any weight exists, exactly
as `from_pretrained` does. So the plan counts the parameters the run will have.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from dolphin_train.config.resolve import RuntimeSettings
from dolphin_train.config.schema import Config
from dolphin_train.model.adapters import new_adapter, prepare_base_for_adapter, quantization_config
from dolphin_train.model.kernel_choice import MlpForward, liger_rms_norm, mlp_forward
from dolphin_train.model.load import apply_tiled_mlp, freeze_except, load_dtype
from dolphin_train.plan.architectures import text_config
from dolphin_train.plan.trace import register_trace_attention, use_liger_like_mlps, use_liger_like_rms_norms

QUANTISED_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes' parameter classes


def build_meta_model(
    cfg: Config, runtime: RuntimeSettings, model_config: Any, vocab_rows: int, new_token_ids: list[int]
) -> Any:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    text = text_config(config)
    text.vocab_size = max(int(text.vocab_size), vocab_rows)  # what resizing to the tokenizer gives
    dtype = load_dtype(cfg, runtime)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=register_trace_attention(), trust_remote_code=cfg.trust_remote_code
        )
    quantization = quantization_config(cfg, runtime)
    if quantization is not None:
        _quantise_skeleton(model, quantization, dtype)
    model.train()
    if cfg.adapter:
        model = new_adapter(cfg, prepare_base_for_adapter(cfg, model), new_token_ids, announce=False)
    freeze_except(cfg, model)
    if mlp_forward(cfg, runtime) is MlpForward.LIGER:  # the MLP training will run (model/kernel_choice.py)
        use_liger_like_mlps(model)
    if liger_rms_norm(cfg, runtime):
        use_liger_like_rms_norms(model)
    apply_tiled_mlp(cfg, model)
    return model


def _quantise_skeleton(model: Any, quantization: Any, dtype: Any) -> None:
    """transformers' quantizer, as `from_pretrained` runs it on the meta-device model before loading."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map=None)
    quantizer.postprocess_model(model)
    # The swapped-in layers are built in float32; loading gives their biases the checkpoint's dtype.
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if is_quantised(getattr(module, "weight", None)) and bias is not None:
            bias.data = bias.data.to(dtype)


def is_quantised(param: Any) -> bool:
    return type(param).__name__ in QUANTISED_WEIGHTS


class _QuantisedLinearStandIn(torch.nn.Module):
    """Computes what a bitsandbytes 4-/8-bit linear layer computes, on the meta device (their kernels need
    real quantised weights): a frozen product in the compute dtype, returned in the input's dtype. Like
    them, it keeps nothing for the backward pass beyond what a frozen linear layer keeps."""

    def __init__(self, layer: torch.nn.Module, compute: torch.dtype) -> None:
        super().__init__()
        out_features, in_features = layer.weight.shape[0], layer.in_features
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features, dtype=compute, device="meta"), requires_grad=False
        )
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, None)
        out = out if self.bias is None else out + self.bias.to(out.dtype)
        return out.to(x.dtype)


def make_computable_on_meta(model: Any, compute: torch.dtype) -> None:
    """Swap quantised linear layers for stand-ins so the forward pass can be traced (after the inventory)."""
    swaps = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and is_quantised(module.weight)]  # fmt: skip
    for name, module in swaps:
        model.set_submodule(name, _QuantisedLinearStandIn(module, compute))
