#!/usr/bin/env python3
"""The fused LoRA functions (`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`) against peft's forward, on
one decoder layer of a real shape: what autograd keeps for the backward pass (parameters left out) and the
time of a forward + backward pass, side by side in one process.

    python scripts/bench_lora_kernels.py [--shape llama3-8b|small] [--tokens 1024] [--device cpu|cuda] [--qlora]

Default: Llama-3-8B's layer (hidden 4,096, MLP 14,336, 32 heads, 8 key/value heads), LoRA r=16 on every
projection, bf16 weights, bf16 autocast (as training runs), 1,024 tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dolphin_train.model.lora_kernels import use_fused_lora

SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
    "small": {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 8, "num_key_value_heads": 2},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one_layer_model(shape: str, device: str, qlora: bool):
    import peft
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=1, vocab_size=256, **SHAPES[shape])
    torch.manual_seed(0)
    if qlora:
        directory = Path("/tmp/bench_lora_kernels_model")
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
        quantised = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = LlamaForCausalLM.from_pretrained(directory, quantization_config=quantised, dtype=torch.bfloat16,
                                                 device_map=device)  # fmt: skip
    else:
        model = LlamaForCausalLM(config).to(device, torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def kept_bytes(module, x: torch.Tensor, device: str) -> int:
    parameters = {p.untyped_storage()._cdata for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage()._cdata not in parameters:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, torch.bfloat16):
        module(x)
    return sum(seen.values())


def step_seconds(module, x: torch.Tensor, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, torch.bfloat16):
            out = module(x)
        out.float().square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--qlora", action="store_true", help="a 4-bit NF4 base (bitsandbytes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    plain = one_layer_model(args.shape, args.device, args.qlora)
    fused = use_fused_lora(copy.deepcopy(plain), mlp=True, qkv=True, o=True)
    hidden = SHAPES[args.shape]["hidden_size"]
    x = torch.randn(1, args.tokens, hidden, device=args.device, dtype=torch.bfloat16, requires_grad=True)
    print(f"{args.shape} layer, {args.tokens} tokens, {'QLoRA' if args.qlora else 'LoRA'} r=16, bf16 autocast, "
          f"{args.device}")  # fmt: skip
    print("| part | peft kept (MiB) | fused kept (MiB) | peft step (ms) | fused step (ms) | time ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for part in ("mlp", "self_attn.q_proj", "self_attn.o_proj"):
        modules = [m.base_model.model.model.layers[0].get_submodule(part) for m in (plain, fused)]
        inputs = x if part != "self_attn.o_proj" else torch.randn_like(x, requires_grad=True)
        kept = [kept_bytes(m, inputs, args.device) / 2**20 for m in modules]
        seconds = [step_seconds(m, inputs, args.device, args.repeats) * 1e3 for m in modules]
        print(f"| {part} | {kept[0]:,.1f} | {kept[1]:,.1f} | {seconds[0]:,.1f} | {seconds[1]:,.1f} | "
              f"{seconds[1] / seconds[0]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
