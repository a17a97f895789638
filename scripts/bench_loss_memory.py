"""Peak memory of one training step (forward + backward) on the CPU with a 128k vocabulary: the model's
plain loss (full logits) against dolphin-train's chunked cross-entropy.

    python scripts/bench_loss_memory.py [--tokens 4096]

A tiny Llama (hidden 64, 2 layers) with Llama-3's vocabulary of 128,256 tokens, one row of 4096 tokens,
every position trained, float32. Each mode runs in a fresh process; the figure is its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def step(mode: str, tokens: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dolphin_train.train.loss import install_chunked_head

    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "plain":
        loss = model(input_ids=ids, labels=ids).loss
    else:
        head = install_chunked_head(model)
        with head.targets(ids):
            loss = model(input_ids=ids).logits  # the head returns the loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": float(loss), "model_mb": before, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--mode", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(step(args.mode, args.tokens)))
        return
    results = {}
    for mode in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--mode", mode, "--tokens", str(args.tokens)]
        results[mode] = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
    print(f"Tiny Llama, vocabulary 128,256, {args.tokens} tokens, float32, CPU\n")
    print("| loss | peak RSS (MB) | over the loaded model (MB) | loss value |")
    print("| --- | ---: | ---: | ---: |")
    for mode, r in results.items():
        name = "plain (full logits)" if mode == "plain" else "chunked cross-entropy"
        print(f"| {name} | {r['peak_mb']:,.0f} | {r['peak_mb'] - r['model_mb']:,.0f} | {r['loss']:.5f} |")


if __name__ == "__main__":
    main()
