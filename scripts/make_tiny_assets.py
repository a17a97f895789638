#!/usr/bin/env python
"""Generate the tiny, deterministic assets used for CPU smoke tests and demos.

Writes (relative to the repo root):
  data/tiny_chat.jsonl                          procedural ShareGPT conversations
  configs/tiny/tokenizer/tokenizer.json         byte-level BPE, 2048 tokens
  configs/tiny/tokenizer/tokenizer_config.json  transformers loading metadata
  configs/tiny/model/config.json                ~2.4M-parameter Llama config

Usage: python scripts/make_tiny_assets.py   (same seed -> byte-identical files)
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

# Why: the BPE trainer counts pairs on a rayon thread pool; pinning it to one
# thread (before tokenizers is imported) keeps merge tie-breaking reproducible.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 1234
NUM_CONVERSATIONS = 400
LONG_FRACTION = 0.02  # a few over-long samples so sequence_len 512 drops some
VOCAB_SIZE = 2048
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
ROOT = Path(__file__).resolve().parent.parent
DATA_PATH = ROOT / "data" / "tiny_chat.jsonl"
TOKENIZER_DIR = ROOT / "configs" / "tiny" / "tokenizer"
MODEL_DIR = ROOT / "configs" / "tiny" / "model"

Exchange = tuple[str, str]  # (human, gpt)

SYSTEM_PROMPTS = [
    "You are Dolphin, a helpful AI assistant.",
    "You are Dolphin, a helpful AI assistant. Answer accurately and politely.",
    "You are a helpful assistant.",
    "You are a concise assistant. Keep your answers short.",
    "You are a friendly tutor who helps students with math, geography and words.",
]

# (country, capital, largest city if it is not the capital)
CAPITALS = [
    ("France", "Paris", None),
    ("Germany", "Berlin", None),
    ("Italy", "Rome", None),
    ("Spain", "Madrid", None),
    ("Portugal", "Lisbon", None),
    ("Japan", "Tokyo", None),
    ("Egypt", "Cairo", None),
    ("Kenya", "Nairobi", None),
    ("Mexico", "Mexico City", None),
    ("Argentina", "Buenos Aires", None),
    ("Peru", "Lima", None),
    ("Norway", "Oslo", None),
    ("Sweden", "Stockholm", None),
    ("Finland", "Helsinki", None),
    ("Poland", "Warsaw", None),
    ("Greece", "Athens", None),
    ("Russia", "Moscow", None),
    ("South Korea", "Seoul", None),
    ("Thailand", "Bangkok", None),
    ("Austria", "Vienna", None),
    ("Ireland", "Dublin", None),
    ("Iceland", "Reykjavík", None),
    ("Colombia", "Bogotá", None),
    ("Chile", "Santiago", None),
    ("the United Kingdom", "London", None),
    ("Brazil", "Brasília", "São Paulo"),
    ("Switzerland", "Bern", "Zürich"),
    ("Canada", "Ottawa", "Toronto"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Nigeria", "Abuja", "Lagos"),
    ("New Zealand", "Wellington", "Auckland"),
    ("Morocco", "Rabat", "Casablanca"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("the United States", "Washington, D.C.", "New York City"),
]

# (plural from, singular from, plural to, factor)
UNITS = [
    ("kilometers", "kilometer", "meters", 1000),
    ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000),
    ("liters", "liter", "milliliters", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7),
    ("feet", "foot", "inches", 12),
    ("yards", "yard", "feet", 3),
]

WORDS = [
    "apple",
    "banana",
    "dolphin",
    "garden",
    "planet",
    "rocket",
    "window",
    "pencil",
    "yellow",
    "river",
    "castle",
    "orange",
    "python",
    "summer",
    "jungle",
    "button",
    "silver",
    "monkey",
    "little",
    "bottle",
    "letter",
    "coffee",
    "mirror",
    "travel",
    "forest",
    "guitar",
    "hammer",
    "island",
    "kitten",
    "ladder",
    "market",
    "number",
    "pepper",
    "puzzle",
    "rabbit",
    "school",
    "tomato",
    "turtle",
    "wizard",
    "zebra",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# (term, definition, example)
GLOSSARY = [
    (
        "algorithm",
        "An algorithm is a step-by-step procedure for solving a problem.",
        "a recipe for baking bread is like an algorithm for the cook.",
    ),
    (
        "variable",
        "A variable is a named value that can change while a program runs.",
        "in x = 5, the name x is a variable.",
    ),
    (
        "function",
        "A function is a reusable block of code that takes inputs and returns an output.",
        "a function square(n) could return n times n.",
    ),
    (
        "compiler",
        "A compiler is a program that translates source code into machine code.",
        "gcc compiles C code into an executable.",
    ),
    (
        "database",
        "A database is an organized collection of data that is easy to search and update.",
        "a library catalog is stored in a database.",
    ),
    (
        "photosynthesis",
        "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen.",
        "the leaves of an oak tree do photosynthesis all summer.",
    ),
    (
        "gravity",
        "Gravity is the force that pulls objects with mass toward each other.",
        "an apple falls to the ground because of gravity.",
    ),
    ("atom", "An atom is the smallest unit of a chemical element.", "a helium atom has two protons."),
    (
        "molecule",
        "A molecule is a group of atoms held together by chemical bonds.",
        "water is a molecule made of two hydrogen atoms and one oxygen atom.",
    ),
    (
        "ecosystem",
        "An ecosystem is a community of living things together with their environment.",
        "a pond with its fish, plants and insects is an ecosystem.",
    ),
    (
        "volcano",
        "A volcano is an opening in the Earth's crust where molten rock escapes.",
        "Mount Etna in Italy is an active volcano.",
    ),
    (
        "noun",
        "A noun is a word that names a person, place, thing or idea.",
        "in 'the cat sleeps', the word cat is a noun.",
    ),
    (
        "verb",
        "A verb is a word that describes an action or a state.",
        "in 'the cat sleeps', the word sleeps is a verb.",
    ),
    (
        "synonym",
        "A synonym is a word that means the same or nearly the same as another word.",
        "big is a synonym of large.",
    ),
    ("antonym", "An antonym is a word with the opposite meaning of another word.", "hot is an antonym of cold."),
    (
        "metaphor",
        "A metaphor is a figure of speech that describes something as if it were something else.",
        "'time is a thief' is a metaphor.",
    ),
    (
        "prime number",
        "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
        "7 is prime because only 1 and 7 divide it.",
    ),
    (
        "fraction",
        "A fraction is a part of a whole, written as one number over another.",
        "3/4 means three out of four equal parts.",
    ),
    (
        "triangle",
        "A triangle is a shape with three sides and three angles.",
        "the angles of any triangle add up to 180 degrees.",
    ),
    (
        "democracy",
        "A democracy is a system of government in which citizens choose their leaders by voting.",
        "holding free elections is a key part of a democracy.",
    ),
]


def pick(rng: random.Random, options: list[str], **fields: object) -> str:
    """Pick one phrasing template and fill it; varied wording is the point."""
    return rng.choice(options).format(**fields)


def times(k: int) -> str:
    return {1: "once", 2: "twice"}.get(k, f"{k} times")


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def arithmetic(rng: random.Random) -> list[Exchange]:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 20), rng.randint(2, 30)
        c, word = a * b, "times"
    elif op == "+":
        a, b = rng.randint(2, 500), rng.randint(2, 500)
        c, word = a + b, "plus"
    else:
        a = rng.randint(20, 900)
        b = rng.randint(1, a - 1)
        c, word = a - b, "minus"
    sym = "x" if op == "*" else op
    q = pick(
        rng,
        [
            "What is {a} {w} {b}?",
            "What's {a} {s} {b}?",
            "Calculate {a} {s} {b}.",
            "Can you compute {a} {w} {b} for me?",
            "How much is {a} {w} {b}?",
        ],
        a=a,
        b=b,
        s=sym,
        w=word,
    )
    ans = pick(rng, ["{a} {s} {b} = {c}.", "The answer is {c}.", "{a} {w} {b} is {c}."], a=a, b=b, s=sym, w=word, c=c)
    d = rng.randint(2, 50)
    follow = rng.choice(
        [
            (
                rng.choice(["Can you double that?", "What is twice that?", "Now double it."]),
                f"Sure: {c} x 2 = {2 * c}.",
            ),
            (f"And if you add {d} to that?", f"{c} + {d} = {c + d}."),
            (f"What about {a} {word} {b + 1}?", f"{a} {sym} {b + 1} = {_apply(op, a, b + 1)}."),
            (f"Is {c} even or odd?", f"{c} is {'even' if c % 2 == 0 else 'odd'}."),
        ]
    )
    return [(q, ans), follow]


def prime_check(rng: random.Random) -> list[Exchange]:
    n = rng.randint(2, 120)
    divisor = next((d for d in range(2, n) if n % d == 0), None)
    q = pick(rng, ["Is {n} a prime number?", "Is {n} prime?", "Tell me whether {n} is prime."], n=n)
    if divisor is None:
        return [(q, f"Yes, {n} is a prime number: its only divisors are 1 and {n}.")]
    return [(q, f"No, {n} is not prime. It is divisible by {divisor}: {n} = {divisor} x {n // divisor}.")]


def capitals(rng: random.Random) -> list[Exchange]:
    (c1, cap1, big1), (c2, cap2, _) = rng.sample(CAPITALS, 2)
    if rng.random() < 0.2:  # reverse direction: capital -> country
        q = pick(rng, ["Which country has {x} as its capital?", "{x} is the capital of which country?"], x=cap1)
        return [(q, f"{cap1} is the capital of {c1}.")]
    q = pick(
        rng,
        [
            "What is the capital of {c}?",
            "What's the capital city of {c}?",
            "Tell me the capital of {c}.",
            "Do you know the capital of {c}?",
        ],
        c=c1,
    )
    ans = pick(rng, ["The capital of {c} is {cap}.", "{cap} is the capital of {c}."], c=c1, cap=cap1)
    largest = (
        f"No. The largest city in {c1} is {big1}, but the capital is {cap1}."
        if big1
        else f"Yes, {cap1} is also the largest city in {c1}."
    )
    follow = rng.choice(
        [
            (
                pick(rng, ["And what about {c}?", "What about {c}?", "And {c}?"], c=c2),
                f"The capital of {c2} is {cap2}.",
            ),
            (f"Is {cap1} also the largest city in {c1}?", largest),
        ]
    )
    return [(q, ans), follow]


def units(rng: random.Random) -> list[Exchange]:
    src, one, dst, k = rng.choice(UNITS)
    if rng.random() < 0.2:  # temperature: multiples of 5 keep Fahrenheit whole
        c = 5 * rng.randint(-8, 20)
        f = c * 9 // 5 + 32
        q = pick(rng, ["What is {c} degrees Celsius in Fahrenheit?", "Convert {c}°C to Fahrenheit."], c=c)
        return [(q, f"{c}°C is {f}°F. (Multiply by 9/5, then add 32.)")]
    n, n2 = rng.sample(range(2, 60), 2)
    q = pick(
        rng, ["How many {d} are in {n} {s}?", "Convert {n} {s} to {d}.", "{n} {s} is how many {d}?"], n=n, s=src, d=dst
    )
    ans = pick(rng, ["{n} {s} is {m} {d}.", "There are {m} {d} in {n} {s}."], n=n, s=src, d=dst, m=n * k)
    follow = rng.choice(
        [
            (f"And {n2} {src}?", f"{n2} {src} is {n2 * k} {dst}."),
            ("How did you get that?", f"There are {k} {dst} in one {one}, so {n} x {k} = {n * k}."),
        ]
    )
    return [(q, ans), follow]


def reverse_word(rng: random.Random) -> list[Exchange]:
    w, w2 = rng.sample(WORDS, 2)
    q = pick(
        rng,
        [
            "Spell '{w}' backwards.",
            "What is {w} reversed?",
            "Can you reverse the word {w}?",
            "Write the word {w} backwards, please.",
        ],
        w=w,
    )
    ans = pick(rng, ["'{w}' backwards is '{r}'.", "Sure! {w} reversed is {r}."], w=w, r=w[::-1])
    follow = rng.choice(
        [
            (pick(rng, ["And {w}?", "Now do {w}."], w=w2), f"{w2} reversed is {w2[::-1]}."),
            ("Now spell it letter by letter.", f"{w}: {'-'.join(w.upper())}."),
        ]
    )
    return [(q, ans), follow]


def count_letters(rng: random.Random) -> list[Exchange]:
    w = rng.choice(WORDS)
    vowels = [ch for ch in w if ch in "aeiou"]
    if rng.random() < 0.5:
        q = pick(rng, ["How many letters are in the word '{w}'?", "How long is the word {w}?"], w=w)
        first = (q, f"The word '{w}' has {len(w)} letters.")
    else:
        ch = rng.choice(w) if rng.random() < 0.8 else rng.choice("qxjvz")
        q = pick(
            rng,
            ["How many times does the letter '{c}' appear in '{w}'?", "Count the letter {c} in the word {w}."],
            c=ch,
            w=w,
        )
        k = w.count(ch)
        first = (
            q,
            f"The letter '{ch}' appears {times(k)} in '{w}'." if k else f"The letter '{ch}' does not appear in '{w}'.",
        )
    follow = (
        "And how many vowels does it have?",
        f"'{w}' has {len(vowels)} vowel{'s' * (len(vowels) != 1)}: {', '.join(vowels)}.",
    )
    return [first, follow]


def sort_numbers(rng: random.Random) -> list[Exchange]:
    nums = rng.sample(range(1, 100), rng.randint(4, 8))
    shown = ", ".join(map(str, nums))
    q = pick(
        rng,
        [
            "Sort these numbers from smallest to largest: {x}.",
            "Please sort {x} in ascending order.",
            "Can you put these in order? {x}",
        ],
        x=shown,
    )
    ans = f"Sorted in ascending order: {', '.join(map(str, sorted(nums)))}."
    follow = rng.choice(
        [
            (
                "Now sort them in descending order.",
                f"In descending order: {', '.join(map(str, sorted(nums, reverse=True)))}.",
            ),
            ("Which one is the largest?", f"The largest number is {max(nums)}."),
            ("What is their sum?", f"The sum is {sum(nums)}."),
        ]
    )
    return [(q, ans), follow]


def weekdays(rng: random.Random) -> list[Exchange]:
    d, n, k = rng.randrange(7), rng.randint(2, 30), rng.randint(2, 6)
    if rng.random() < 0.3:
        q = f"Today is {DAYS[d]}. What day was it {n} days ago?"
        return [(q, f"{n} days ago it was {DAYS[(d - n) % 7]}.")]
    r = (d + n) % 7
    q = pick(
        rng,
        ["If today is {d}, what day will it be in {n} days?", "What day of the week comes {n} days after {d}?"],
        d=DAYS[d],
        n=n,
    )
    ans = f"{n} days after {DAYS[d]} it will be {DAYS[r]}. ({n} = 7 x {n // 7} + {n % 7})"
    return [(q, ans), (f"And {k} days after that?", f"{k} days after {DAYS[r]} is {DAYS[(r + k) % 7]}.")]


def definitions(rng: random.Random) -> list[Exchange]:
    (t1, d1, e1), (t2, d2, _) = rng.sample(GLOSSARY, 2)
    # Why: "An algorithm is ..." -> "an algorithm", so questions get the right article.
    p1, p2 = (d[: d.index(" is ")].lower() for d in (d1, d2))
    q = pick(
        rng, ["What is {p}?", "Define '{t}'.", "What does '{t}' mean?", "Can you explain what {t} means?"], t=t1, p=p1
    )
    ans = pick(rng, ["{d}", "Sure! {d}", "Here is a simple definition: {d}"], d=d1)
    follow = rng.choice(
        [
            (pick(rng, ["And what about {t}?", "What is {p} then?"], t=t2, p=p2), d2),
            ("Can you give an example?", f"For example, {e1}"),
        ]
    )
    return [(q, ans), follow]


def greeting(rng: random.Random) -> Exchange:
    roll = rng.random()
    if roll < 0.3:
        q = rng.choice(["Who are you?", "What is your name?", "What should I call you?"])
        return q, "I'm Dolphin, a helpful AI assistant. How can I help you?"
    if roll < 0.5:
        q = rng.choice(["Hey, how are you?", "Hi, how are you doing?"])
        return q, "I'm doing well, thanks for asking! What can I do for you?"
    q = rng.choice(["Hi!", "Hello there.", "Good morning!", "Hello!"])
    return q, rng.choice(["Hello! How can I help you today?", "Hi! What can I do for you?"])


def thanks(rng: random.Random) -> Exchange:
    q = rng.choice(["Thanks!", "Thank you, that helps.", "Great, thanks a lot.", "Perfect, thank you!"])
    return q, rng.choice(["You're welcome!", "Happy to help! Let me know if you have any other questions.", "Anytime!"])


TASKS: list[Callable[[random.Random], list[Exchange]]] = [
    arithmetic,
    prime_check,
    capitals,
    units,
    reverse_word,
    count_letters,
    sort_numbers,
    weekdays,
    definitions,
]


def long_exchange(rng: random.Random) -> Exchange:
    """One deliberately long answer (~1.5-3k characters)."""
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(400, 560)
        return f"Count from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + "."
    if kind == 1:
        k = rng.randint(3, 12)
        rows = "\n".join(f"{k} x {i} = {k * i}" for i in range(1, 151))
        return f"Write out the multiplication table of {k} from 1 to 150.", rows
    terms = rng.sample(GLOSSARY, 18)
    paras = "\n\n".join(f"{t.capitalize()}: {d} For example, {e}" for t, d, e in terms)
    return "Explain a few important terms from science, language and computing.", paras


def make_conversation(rng: random.Random, long: bool) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    if rng.random() < 0.3:
        turns.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
    n_tasks = rng.choice([1, 2, 2, 3, 3, 4])
    exchanges: list[Exchange] = [long_exchange(rng)] if long else []
    while len(exchanges) < n_tasks:
        # Why: truncating a task's prefix keeps follow-ups anchored to their question.
        exchanges.extend(rng.choice(TASKS)(rng)[: n_tasks - len(exchanges)])
    if len(exchanges) < 4 and rng.random() < 0.2:
        exchanges.insert(0, greeting(rng))
    if len(exchanges) < 4 and rng.random() < 0.2:
        exchanges.append(thanks(rng))
    for human, gpt in exchanges:
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return turns


def make_dataset(seed: int, n: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    n_long = round(n * LONG_FRACTION)
    seen: set[str] = set()
    convs: list[list[dict[str, str]]] = []
    while len(convs) < n:
        conv = make_conversation(rng, long=len(convs) < n_long)
        key = json.dumps(conv)
        if key not in seen:  # avoid exact duplicates leaking across train/eval
            seen.add(key)
            convs.append(conv)
    rng.shuffle(convs)
    return convs


def write_jsonl(path: Path, convs: list[list[dict[str, str]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for conv in convs:
            f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")


def training_texts(convs: list[list[dict[str, str]]]) -> list[str]:
    # Why: include the ChatML role names so "user"/"assistant" become single tokens.
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    return [f"{role[t['from']]}\n{t['value']}\n" for conv in convs for t in conv]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],  # ids 0 and 1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Why: mirror Llama-3 -- ByteLevel offsets fix-up, then BOS prepended to each sequence.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, tok.token_to_id(BOS))],
            ),
        ]
    )
    return tok


def tokenizer_config(tok: Tokenizer) -> dict[str, object]:
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in (BOS, EOS)
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def model_config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 48,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def count_params(cfg: dict) -> int:
    """Llama parameter count from the config alone (no transformers needed)."""
    h, i, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q_dim, kv_dim = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    attn = h * q_dim * 2 + h * kv_dim * 2  # q, o, k, v projections (no bias)
    layer = attn + 3 * h * i + 2 * h  # + gate/up/down MLP + two RMSNorms
    heads = v * h * (1 if cfg["tie_word_embeddings"] else 2)
    return heads + cfg["num_hidden_layers"] * layer + h


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    convs = make_dataset(SEED, NUM_CONVERSATIONS)
    write_jsonl(DATA_PATH, convs)
    print(f"wrote {DATA_PATH.relative_to(ROOT)}: {len(convs)} conversations")

    tok = train_tokenizer(training_texts(convs))
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOKENIZER_DIR / "tokenizer.json"))
    write_json(TOKENIZER_DIR / "tokenizer_config.json", tokenizer_config(tok))
    print(f"wrote {TOKENIZER_DIR.relative_to(ROOT)}/tokenizer.json: vocab size {tok.get_vocab_size()}")
    print(f"wrote {TOKENIZER_DIR.relative_to(ROOT)}/tokenizer_config.json: bos {BOS}, eos {EOS}")

    cfg = model_config()
    write_json(MODEL_DIR / "config.json", cfg)
    print(f"wrote {MODEL_DIR.relative_to(ROOT)}/config.json: {count_params(cfg):,} params")


if __name__ == "__main__":
    main()
