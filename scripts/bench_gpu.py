"""GPU benchmark: a Llama-3.2-1B-shaped model (random init, bf16 weights, AdamW) on packed 4096-token
rows with gradient checkpointing, for each available attention backend, and padded to the longest
conversation for comparison. Prints trained tokens/s and MFU as a Markdown table.

    python scripts/bench_gpu.py [--steps 10] [--rows 2]

Conversation lengths follow the data-preparation benchmark corpus (log-normal, most under 1k tokens).
Run by scripts/gpu_check.sh; needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

from dolphin_train.config.machine import torch_varlen_available
from dolphin_train.data.packing import best_fit_decreasing
from dolphin_train.model.attention import register_varlen_attention
from dolphin_train.train.throughput import flops_per_token, peak_flops

LLAMA_32_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_cache": False,
}


def conversation_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.3, 0.9, n).astype(int), 16, 4096)


def batches(lengths: np.ndarray, rows: int, seq: int, packed: bool, steps: int, vocab: int):
    """(input_ids, labels, position_ids) batches: packed rows of `seq` tokens, or one conversation per
    row padded to the longest in its batch (with an attention mask) for the comparison."""
    rng = np.random.default_rng(1)
    groups = best_fit_decreasing(lengths, seq) if packed else [[i] for i in rng.permutation(len(lengths))]
    for step in range(steps):
        chosen = groups[step * rows : (step + 1) * rows]
        sizes = [int(sum(lengths[i] for i in g)) for g in chosen]
        width = seq if packed else max(sizes)
        ids = torch.randint(3, vocab, (rows, width))
        pos = torch.zeros(rows, width, dtype=torch.long)
        labels = ids.clone()
        mask = torch.zeros(rows, width, dtype=torch.long)
        for r, g in enumerate(chosen):
            at = 0
            for i in g:
                n = int(lengths[i])
                pos[r, at : at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)
            labels[r, at:] = -100
            mask[r, :at] = 1
        trained = sum(sizes)
        if packed:
            yield {"input_ids": ids, "labels": labels, "position_ids": pos}, trained
        else:
            yield {"input_ids": ids, "labels": labels, "attention_mask": mask}, trained


def run(attn: str, packed: bool, steps: int, rows: int, seq: int) -> tuple[float, float, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_32_1B)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model.set_attn_implementation(attn)
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    lengths = conversation_lengths(4000)
    torch.cuda.reset_peak_memory_stats()
    tokens = 0
    start = None
    for step, (batch, trained) in enumerate(batches(lengths, rows, seq, packed, steps + 2, config.vocab_size)):
        if step == 2:  # two warm-up steps
            torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        tokens += trained
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tps = tokens / seconds
    peak = peak_flops(torch.cuda.get_device_name()) or float("nan")
    mfu = tps * flops_per_token(model, seq) / peak
    return tps, mfu, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2, help="rows per step (micro batch)")
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    backends = ["sdpa"]
    if torch_varlen_available():
        backends.append(register_varlen_attention())
    if importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attention_2")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Llama-3.2-1B shape, bf16, {args.seq} tokens")
    print("| rows | attention | trained tokens/s | MFU | peak memory (GiB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for attn in backends:
        tps, mfu, mem = run(attn, True, args.steps, args.rows, args.seq)
        print(f"| packed | {attn} | {tps:,.0f} | {mfu:.1%} | {mem:.1f} |", flush=True)
    tps, mfu, mem = run("sdpa", False, args.steps, args.rows, args.seq)
    print(f"| padded to longest | sdpa | {tps:,.0f} | {mfu:.1%} | {mem:.1f} |", flush=True)


if __name__ == "__main__":
    main()
