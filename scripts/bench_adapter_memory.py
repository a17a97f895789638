"""Peak memory of full fine-tuning, LoRA and QLoRA on the CPU, for the adapter page's table (docs/adapters.md).

    python scripts/bench_adapter_memory.py

A Llama-architecture model of about 200M parameters (hidden 1024, 12 layers, 32k vocabulary),
randomly initialised and saved once, trains 3 steps of 2 packed rows of 512 tokens from the
repository's sample data in each mode, each in a fresh `dolphin-train` process; the figure is the
process's peak RSS (`peak_memory_mb` in run_summary.json; on a GPU the same field holds peak CUDA
memory). The tokenizer already holds the ChatML tokens, so the adapters train only their LoRA weights
(adding tokens would also train the embeddings in full).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "full fine-tuning (adamw_torch)": {"optimizer": "adamw_torch"},
    "full fine-tuning (adamw_8bit)": {"optimizer": "adamw_8bit"},
    "LoRA r=16, all linear layers": {"adapter": "lora", "lora_r": 16},
    "QLoRA r=16 (4-bit NF4 base)": {"adapter": "qlora", "load_in_4bit": True, "lora_r": 16},
}


def make_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "configs/tiny/tokenizer")
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save_pretrained(path)


def make_base(path: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = make_base(tmp / "base")
        make_tokenizer(tmp / "tokenizer")
        print(f"Llama-architecture model, {params / 1e6:.0f}M parameters, float32 on the CPU, 3 steps\n")
        print("| mode | trainable parameters | peak RSS (MB) |")
        print("| --- | ---: | ---: |")
        for name, keys in MODES.items():
            out = tmp / name.split()[0]
            cfg = {
                "base_model": str(tmp / "base"),
                "tokenizer_config": str(tmp / "tokenizer"),
                "datasets": [{"path": str(REPO / "data/tiny_chat.jsonl")}],
                "dataset_prepared_path": str(tmp / "prepared"),
                "output_dir": str(out),
                "sequence_len": 512, "sample_packing": True, "micro_batch_size": 2, "max_steps": 3,
                "learning_rate": 1e-4, "bf16": False, "save_steps": 100, "chunked_cross_entropy": False,
                **keys,
            }  # fmt: skip
            config = tmp / "c.yml"
            config.write_text(yaml.safe_dump(cfg))
            result = subprocess.run(
                [sys.executable, "-m", "dolphin_train", str(config)], capture_output=True, text=True
            )
            if result.returncode != 0:
                sys.exit(result.stderr[-2000:])
            summary = json.loads((out / "run_summary.json").read_text())
            trainable = _trainable(result.stdout)
            print(f"| {name} | {trainable} | {summary['peak_memory_mb']:,.0f} |", flush=True)


def _trainable(stdout: str) -> str:
    for line in stdout.splitlines():
        if "parameters (trainable)" in line:
            return line.split("(")[-1].split(")")[0].strip() if "(" in line else "?"
    return "?"


if __name__ == "__main__":
    main()
