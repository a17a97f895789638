"""Benchmark sample packing on the data-preparation benchmark corpus.

    python scripts/bench_packing.py --n 20000 --steps 30
    python scripts/bench_packing.py --pack-only 1000000,3000000   # packing time alone, random lengths

1. Packing efficiency: the corpus is prepared with the real Llama-3 tokenizer, then packed by
   best-fit decreasing at sequence_len 2048, 4096 and 8192 (conversations longer than a row are left
   out of that row size, as training would drop them): rows, the lower bound ceil(tokens / capacity),
   and real tokens / row capacity.
2. Training throughput on the CPU: the repository's tiny Llama (2.4M parameters) trains for the same
   number of optimizer steps on the same conversations (tokenized with the tiny tokenizer), packed into
   rows of 2048 tokens versus one conversation per row padded to the longest in the batch; trained
   (non-padding) tokens per second of each, measured one after the other in this process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import llama3_dir, write_corpus

REPO = Path(__file__).resolve().parents[1]


def _config(data: Path, work: Path, **overrides) -> dict:
    cfg = {
        "datasets": [{"path": str(data), "type": "sharegpt"}],
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "out"),
        "bf16": False,
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def packing_efficiency(data: Path, work: Path) -> None:
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.data.packing import pack_conversations
    from dolphin_train.data.prepare import prepare_data
    from dolphin_train.model.tokenizer import load_tokenizer

    cfg = validate_mapping(_config(data, work, base_model=llama3_dir(), sequence_len=8192))
    prepared = prepare_data(cfg, load_tokenizer(cfg).tokenizer)
    lengths = np.asarray(prepared.train["length"], dtype=np.int64)
    print(f"\n{len(lengths):,} conversations, {int(lengths.sum()):,} tokens (Llama-3 tokenizer)\n")
    print("| sequence_len | conversations | rows | lower bound | rows over bound | efficiency | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for capacity in (2048, 4096, 8192):
        fits = lengths[lengths <= capacity]
        start = time.perf_counter()
        plan = pack_conversations(fits, capacity, seed=0)
        seconds = time.perf_counter() - start
        over = len(plan.bins) / plan.lower_bound_rows - 1
        print(f"| {capacity} | {len(fits):,} | {len(plan.bins):,} | {plan.lower_bound_rows:,} | {over:.3%} | "
              f"{plan.efficiency:.3%} | {seconds:.2f} |")  # fmt: skip


def train_tokens_per_second(data: Path, work: Path, packed: bool, steps: int) -> tuple[float, float]:
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.recipe import set_up_run

    tiny = {
        "base_model": str(REPO / "configs/tiny/model"),
        "tokenizer_config": str(REPO / "configs/tiny/tokenizer"),
        "train_from_scratch": True,
    }
    run = {"sequence_len": 2048, "sample_packing": packed, "micro_batch_size": 4, "max_steps": steps}
    log = {"learning_rate": 1e-3, "logging_steps": steps, "save_steps": 10_000}
    cfg = validate_mapping(_config(data, work, **tiny, **run, **log))
    trainer = set_up_run(cfg).trainer
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    return tokens / seconds, seconds


def packing_time(counts: list[int]) -> None:
    """Seconds to plan the packing of N conversations of random length 20-4095 into 4096-token rows."""
    from dolphin_train.data.packing import pack_conversations

    print("| conversations | seconds | efficiency |")
    print("| ---: | ---: | ---: |")
    for n in counts:
        lengths = np.random.default_rng(0).integers(20, 4096, n)
        start = time.perf_counter()
        plan = pack_conversations(lengths, 4096, seed=0)
        print(f"| {n:,} | {time.perf_counter() - start:.2f} | {plan.efficiency:.4%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="conversations in the corpus")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per throughput run")
    parser.add_argument("--pack-only", help="comma-separated conversation counts: time the packing alone")
    args = parser.parse_args()
    if args.pack_only:
        packing_time([int(n) for n in args.pack_only.split(",")])
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "corpus.jsonl"
        write_corpus(data, args.n)
        packing_efficiency(data, work / "efficiency")
        padded, padded_s = train_tokens_per_second(data, work / "padded", packed=False, steps=args.steps)
        packed, packed_s = train_tokens_per_second(data, work / "packed", packed=True, steps=args.steps)
        print(f"\nTiny Llama on the CPU, {args.steps} steps of 4 rows, sequence_len 2048:\n")
        print("| rows | trained tokens/s | seconds | ratio |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| padded to the longest in the batch | {padded:,.0f} | {padded_s:.1f} | 1.00x |")
        print(f"| packed (best-fit decreasing) | {packed:,.0f} | {packed_s:.1f} | {packed / padded:.2f}x |")


if __name__ == "__main__":
    main()
