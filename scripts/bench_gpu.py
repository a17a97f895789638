"""GPU throughput ladder: each lever's share, measured through dolphin-train's own training path.

    python scripts/bench_gpu.py [--steps 8] [--only 1b-baseline,1b-liger] [--budget 450]
    python scripts/bench_gpu.py --small     # the same flow with tiny shapes on the CPU (a smoke test)

Every rung is a real run of the recipe (`set_up_run`, then `trainer.train()`) on packed 4096-token rows of
synthetic conversations whose lengths follow the data-preparation benchmark's corpus (the Llama-3
tokenizer, ChatML), with random weights made on the GPU. For each: trained (non-padding) tokens per second
and MFU, both from the run's own logs after two warm-up steps (MFU counts the FLOPs each batch really
computes: docs/training.md, "Throughput"), hardware FLOPs utilisation where checkpointing recomputes, and peak
allocated memory. The ladder on the Llama-3.2-1B shape adds one lever at a time; then the Llama-3-8B shape
in full fine-tuning and in QLoRA, the latter next to the plain transformers + peft path. It prints a
Markdown table as it goes and stops starting rungs once `--budget` seconds are spent.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import llama3_dir, write_corpus  # the corpus of the preparation benchmark
from gpu_memory_check import model_dir  # random checkpoints, shared with the memory check

BASE = {"sequence_len": 4096, "sample_packing": True, "pad_to_sequence_len": True, "micro_batch_size": 2,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-5, "optimizer": "adamw_torch_fused",
        "max_grad_norm": 1.0, "bf16": True, "flash_attention": True, "logging_steps": 1, "liger_kernel": False,
        "torch_compile": False, "gradient_checkpointing": True, "save_steps": 100000,
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
        "tokens": ["<|im_start|>", "<|im_end|>"]}  # fmt: skip
# (name, architecture, settings over BASE, what it shows): one lever added at a time on the 1B shape.
RUNGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("1b-baseline", "llama-3.2-1b", {}, "checkpointing every layer, no fused kernels (the earlier reading)"),
    ("1b-no-ckpt", "llama-3.2-1b", {"gradient_checkpointing": False}, "+ no recomputation (activations fit)"),
    ("1b-auto-ckpt", "llama-3.2-1b", {"gradient_checkpointing": "auto"}, "+ checkpointing chosen by the plan"),
    ("1b-liger", "llama-3.2-1b", {"gradient_checkpointing": "auto", "liger_kernel": True,
                                  "liger_rope": True, "liger_rms_norm": True, "liger_glu_activation": True},
     "+ Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)"),
    ("1b-compile", "llama-3.2-1b", {"gradient_checkpointing": "auto", "liger_kernel": True, "liger_rope": True,
                                    "liger_rms_norm": True, "liger_glu_activation": True, "torch_compile": True},
     "+ compiled decoder layers"),
    ("1b-fp8", "llama-3.2-1b", {"gradient_checkpointing": "auto", "liger_kernel": True, "liger_rope": True,
                                "liger_rms_norm": True, "liger_glu_activation": True, "torch_compile": True,
                                "fp8": True}, "+ float8 matrix products (rowwise)"),
    ("1b-padded", "llama-3.2-1b", {"sample_packing": False, "pad_to_sequence_len": False, "micro_batch_size": 4},
     "baseline settings, one conversation per row padded to the longest (vs 1b-baseline)"),
    ("8b-full", "meta-llama-3-8b", {"micro_batch_size": 1, "gradient_checkpointing": "auto", "liger_kernel": True,
                                    "liger_rope": True, "liger_rms_norm": True, "liger_glu_activation": True,
                                    "torch_compile": True, "bfloat16": True, "optimizer_in_backward": True,
                                    "optimizer": "adamw_torch_8bit", "max_grad_norm": 0.0},
     "full fine-tuning, bf16 weights, 8-bit AdamW in the backward pass"),
    ("8b-qlora", "meta-llama-3-8b", {"micro_batch_size": 1, "adapter": "qlora", "load_in_4bit": True, "lora_r": 16,
                                     "optimizer": "adamw_8bit", "liger_kernel": True, "liger_rope": True,
                                     "liger_rms_norm": True, "liger_glu_activation": True},
     "QLoRA r=16, new tokens' rows only, chunked loss"),
    ("8b-qlora-plain", "meta-llama-3-8b", {"micro_batch_size": 1, "adapter": "qlora", "load_in_4bit": True,
                                           "lora_r": 16, "optimizer": "adamw_8bit", "chunked_cross_entropy": False,
                                           "lora_modules_to_save": ["embed_tokens", "lm_head"]},
     "the plain transformers + peft path: full logits, embeddings trained in full, no fused kernels"),
]  # fmt: skip
def run_rung(root: Path, name: str, shape: str, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.recipe import set_up_run

    quantised = settings.get("load_in_4bit", False)
    cfg = {**BASE, **settings, "base_model": str(model_dir(root, shape, args.small, with_weights=quantised)),
           "train_from_scratch": not quantised, "tokenizer_config": llama3_dir(), "max_steps": args.steps + 2,
           "datasets": [{"path": str(root / "data.jsonl"), "type": "sharegpt"}],
           "dataset_prepared_path": str(root / "prepared"), "output_dir": str(root / name)}  # fmt: skip
    if args.small:
        cfg.update(sequence_len=1024, bf16=torch.cuda.is_available(), torch_compile=False, fp8=False,
                   liger_kernel=False, flash_attention=torch.cuda.is_available())  # fmt: skip
        for kernel in [key for key in cfg if key.startswith("liger_") and key != "liger_kernel"]:
            del cfg[kernel]  # Liger's kernels are off in the smoke test: their keys go with them
        if cfg.get("optimizer") == "adamw_torch_fused" and not torch.cuda.is_available():
            cfg["optimizer"] = "adamw_torch"
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    started = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random weights made on the GPU
        run = set_up_run(validate_mapping(cfg))
    run.trainer.train()
    logs = [e for e in run.trainer.state.log_history if "tokens_per_second" in e][2:]  # after two warm-up steps
    median = lambda key: sorted(e[key] for e in logs)[len(logs) // 2] if logs and key in logs[0] else float("nan")  # noqa: E731
    found = {"rung": name, "tokens_per_second": median("tokens_per_second"), "mfu": median("mfu"),
             "hfu": median("hfu"), "peak_gib": torch.cuda.max_memory_allocated() / 2**30
             if torch.cuda.is_available() else float("nan"), "seconds": time.perf_counter() - started,
             "settings": {k: run.cfg.model_dump()[k] for k in ("micro_batch_size", "gradient_checkpointing",
                                                             "gradient_checkpointing_layers")}}  # fmt: skip
    del run
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per rung (after two warm-up steps)")
    parser.add_argument("--only", default=None, help="comma-separated rung names")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds: no rung starts after this")
    parser.add_argument("--small", action="store_true", help="tiny shapes, CPU or GPU: a smoke test of the flow")
    parser.add_argument("--root", default="/tmp/dolphin-bench-gpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data.jsonl").exists():
        write_corpus(root / "data.jsonl", 3000 if not args.small else 300)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}; packed 4096-token rows of the preparation benchmark's corpus")
    print("| rung | what | trained tokens/s | MFU | HFU | peak GiB | micro batch, checkpointing |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |", flush=True)
    started, results = time.perf_counter(), []
    chosen = set(args.only.split(",")) if args.only else None
    for name, shape, settings, what in RUNGS:
        if chosen is not None and name not in chosen:
            continue
        if time.perf_counter() - started > args.budget:
            print(f"| {name} | {what} | not run: the time budget was spent | | | | |", flush=True)
            continue
        try:
            r = run_rung(root, name, shape, settings, args)
        except Exception as exc:  # a rung that fails (a kernel missing on this image) leaves the others
            print(f"| {name} | {what} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | | |", flush=True)
            continue
        results.append(r)
        s = r["settings"]
        print(f"| {name} | {what} | {r['tokens_per_second']:,.0f} | {r['mfu']:.1%} | {r['hfu']:.1%} | "
              f"{r['peak_gib']:.1f} | {s['micro_batch_size']}, {s['gradient_checkpointing']} "
              f"(every {s['gradient_checkpointing_layers']}) |", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
