"""Exact token ids and labels with the real Llama-3 tokenizer, and the masking rule on generated data."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dolphin_train.config.schema import DatasetConfig
from dolphin_train.data.encode import IGNORE_INDEX, ConversationEncoder, trained_token_mask
from dolphin_train.data.formats import RowConverter
from dolphin_train.data.templates import ChatMLTemplate

BOS, IM_END, IM_START = 128000, 128257, 128258
NL, SYSTEM, USER, ASSISTANT = 198, 9125, 882, 78191


SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def chat_rows(conversations, **dataset_keys):
    """Canonical rows (as the preparation stage stores them) for (roles, contents) pairs, read as ShareGPT."""
    convert = RowConverter(DatasetConfig(path="-", type="sharegpt", **dataset_keys), None, False)
    rows = [
        convert({"conversations": [{"from": SHAREGPT_NAMES[r], "value": c} for r, c in zip(*conv, strict=True)]})
        for conv in conversations
    ]
    return {k: [row[k] for row in rows] for k in rows[0]}


def _encode(tokenizer, roles, contents, train_on_inputs=False, sequence_len=4096, truncate=False):
    enc = ConversationEncoder(tokenizer, sequence_len, train_on_inputs, truncate)
    out = enc(chat_rows([(roles, contents)]))
    return out["input_ids"][0].tolist(), out["labels"][0].tolist(), out["status"][0]


def test_chatml_markers_become_single_new_tokens(llama3) -> None:
    tok = llama3.tokenizer
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [IM_END, IM_START]
    assert llama3.new_token_ids == [IM_END, IM_START]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|end_of_text|>"
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"] == [
        IM_START,
        USER,
        NL,
        6151,
        IM_END,
    ]


def test_system_and_two_turns_exact_ids_and_labels(llama3) -> None:
    roles = ["system", "user", "assistant", "user", "assistant"]
    contents = ["You are Dolphin.", "What is 2+2?", "4.", "And 3+3?", "6, since 3+3=6."]
    ids, labels, status = _encode(llama3.tokenizer, roles, contents)
    x = IGNORE_INDEX
    expected_ids = [
        BOS,
        IM_START, SYSTEM, NL, 2675, 527, 96096, 13, IM_END, NL,  # system: "You are Dolphin."
        IM_START, USER, NL, 3923, 374, 220, 17, 10, 17, 30, IM_END, NL,  # user: "What is 2+2?"
        IM_START, ASSISTANT, NL, 19, 13, IM_END, NL,  # assistant: "4."
        IM_START, USER, NL, 3112, 220, 18, 10, 18, 30, IM_END, NL,  # user: "And 3+3?"
        IM_START, ASSISTANT, NL, 21, 11, 2533, 220, 18, 10, 18, 28, 21, 13, IM_END, NL,  # "6, since 3+3=6."
    ]  # fmt: skip
    expected_labels = [x] * 25 + [19, 13, IM_END, x] + [x] * 14 + [21, 11, 2533, 220, 18, 10, 18, 28, 21, 13, IM_END, x]
    assert ids == expected_ids
    assert labels == expected_labels
    assert status == 0


def test_train_on_inputs_trains_everything_but_the_first_token(llama3) -> None:
    ids, labels, _ = _encode(llama3.tokenizer, ["user", "assistant"], ["Hi", "Hello!"], train_on_inputs=True)
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_over_long_conversations_are_flagged_or_truncated(llama3) -> None:
    roles, contents = ["user", "assistant"], ["word " * 80, "answer " * 50]
    ids, _, status = _encode(llama3.tokenizer, roles, contents, sequence_len=64)
    assert status == 2 and len(ids) > 64  # TOO_LONG: dropped (and counted) by the pipeline
    ids, labels, status = _encode(llama3.tokenizer, roles, contents, sequence_len=64, truncate=True)
    assert status == 3 and len(ids) == 64  # truncated inside the user turn: no trainable token left
    ids, labels, status = _encode(
        llama3.tokenizer, ["user", "assistant"], ["Hi", "answer " * 80], sequence_len=64, truncate=True
    )
    assert status == 1 and len(ids) == 64 and labels[-1] != IGNORE_INDEX


def test_mask_from_offsets_handles_straddling_tokens() -> None:
    # token 0 covers chars 0-3, token 1 chars 3-6 straddling a span starting at 5, token 2 inside it.
    offsets = np.array([[0, 3], [3, 6], [6, 9], [9, 9]])
    assert trained_token_mask(offsets, [(5, 9)], 9).tolist() == [False, True, True, False]


def test_rendering_matches_the_saved_chat_template(llama3) -> None:
    tok = llama3.tokenizer
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    rendered = ChatMLTemplate().render(
        [m["role"] for m in messages], [m["content"] for m in messages], [False, False, True], [False, False, True]
    )
    assert tok.apply_chat_template(messages, tokenize=False) == rendered.text
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == rendered.text[: rendered.text.index("A<|im_end|>")]


def _random_conversation(rng: random.Random) -> tuple[list[str], list[str]]:
    words = ["alpha", "beta", " gamma", "δέλτα", "emoji 🐬", "code `x = 1`", "\tindent", "new\nline", "  spaces", "42"]
    roles: list[str] = ["system"] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        roles += ["user", "assistant"]
    contents = [
        "".join(rng.choice(words) + rng.choice([" ", "", ". "]) for _ in range(rng.randint(1, 30))).strip() or "x"
        for _ in roles
    ]
    return roles, contents


def test_masking_rule_holds_on_a_generated_corpus(llama3) -> None:
    """Property: decoding each maximal run of trained tokens gives an assistant content + <|im_end|>,
    in order, and nothing else is trained."""
    tok = llama3.tokenizer
    rng = random.Random(0)
    batch = [_random_conversation(rng) for _ in range(1000)]
    enc = ConversationEncoder(tok, 100_000, False, False)
    out = enc(chat_rows(batch))
    for (roles, contents), ids, labels in zip(batch, out["input_ids"], out["labels"], strict=True):
        runs, current = [], []
        for i, lab in zip(ids.tolist(), labels.tolist(), strict=True):
            if lab != IGNORE_INDEX:
                assert lab == i
                current.append(i)
            elif current:
                runs.append(current)
                current = []
        assert not current
        expected = [c + "<|im_end|>" for r, c in zip(roles, contents, strict=True) if r == "assistant"]
        assert [tok.decode(r) for r in runs] == expected


def test_fast_bpe_engine_gives_identical_ids_and_labels(llama3) -> None:
    """The tiktoken engine is only an accelerator: same ids, same labels as the Hugging Face path,
    on a corpus with non-ASCII text, emoji, tabs and newlines."""
    from dolphin_train.data.fast_bpe import FastBPE

    tok = llama3.tokenizer
    fast = FastBPE.from_tokenizer(tok)
    assert fast is not None
    rng = random.Random(1)
    batch = chat_rows([_random_conversation(rng) for _ in range(500)])
    slow_out = ConversationEncoder(tok, 100_000, False, False)(batch)
    fast_out = ConversationEncoder(tok, 100_000, False, False, fast=fast)(batch)
    for key in ("input_ids", "labels"):
        assert [a.tolist() for a in slow_out[key]] == [b.tolist() for b in fast_out[key]]


def test_fast_bpe_engine_survives_pickling_and_declines_other_tokenizers(llama3) -> None:
    import pickle

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dolphin_train.data.fast_bpe import FastBPE

    fast = pickle.loads(pickle.dumps(FastBPE.from_tokenizer(llama3.tokenizer)))
    assert fast.encode_batch(["Hello world"]) == [
        llama3.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    ]
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    assert FastBPE.from_tokenizer(PreTrainedTokenizerFast(tokenizer_object=word_level)) is None


def test_mask_rules_agree_for_sorted_and_unsorted_offsets() -> None:
    from dolphin_train.data.encode import _trained_token_mask_unsorted

    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = np.sort(rng.choice(np.arange(1, 300), size=40, replace=False))
        bounds = np.concatenate(([0], cuts, [300]))
        offsets = np.stack([bounds[:-1], bounds[1:]], axis=1)
        a, b = sorted(rng.choice(300, size=2, replace=False))
        spans = [(int(a), int(b))]
        assert (trained_token_mask(offsets, spans, 300) == _trained_token_mask_unsorted(offsets, spans, 300)).all()


# Text on which tiktoken's whole-word lookup and Hugging Face's merges part ways (" Việt" is one Llama-3 token
# that its merges cannot reach), with code, other scripts, emoji and odd whitespace around it.
HARD_TEXTS = [
    " Việt",
    "Tiếng Việt là ngôn ngữ chính thức của Việt Nam.",
    "Türkiye'nin ihtiyaç tarihi Erdoğan yabancı kültür bulundu olacaktır; státní tématu udělat.",
    "Москва — ситуации ремонт натураль осложн. 東京は日本の首都です。数据科学 🚀👍🏽 👨‍👩‍👧‍👦 🇻🇳",
    "def f(x):\n\treturn x ** 2  # square\r\n\r\n    \n\n\n   \u00a0\u2009\u3000 tab\t\tend",
    "It's WE'LL they've I'd ſ 'ſ 'S 1234567890 3.14159 0xFF",
]


def _property_texts(seed: int, n: int) -> list[str]:
    """Random mixtures of pieces of HARD_TEXTS and single characters from many scripts."""
    rng = random.Random(seed)
    alphabet = "aeiouyáàảãạăắằẳẵặâấầẩẫậđéèẻẽẹêếềểễệíìỉĩịóòỏõọôốồổỗộơớờởỡợúùủũụưứừửữựýỳỷỹỵ"
    alphabet += "çğıöşüÇĞİÖŞÜčďěňřšťůžЖжЯя東京数据한국αβ—–…“”'\" \t\n\r.,;:!?()[]{}<>_#0123456789🚀"
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.5:
                text = rng.choice(HARD_TEXTS)
                start = rng.randrange(len(text))
                parts.append(text[start : start + rng.randint(1, 40)])
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        texts.append("".join(parts))
    return texts


def _gpt2_style_tokenizer(pre_tokenizer: str):
    """A byte-level BPE trained here, GPT-2 style (ByteLevel regex) or Qwen style (Split regex, then ByteLevel),
    plus one vocabulary word its merges cannot reach (as Llama-3 has)."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre_tokenizer == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        qwen = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        qwen += r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        split = pre_tokenizers.Split(Regex(qwen), "isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(HARD_TEXTS * 20 + _property_texts(7, 300), trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    word = "".join(pre_tokenizers.ByteLevel(False, use_regex=False).pre_tokenize_str(" unreachable")[0][0])
    assert word not in vocab
    vocab[word] = len(vocab)
    state["added_tokens"] = [{"id": len(vocab), "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}]  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)))


def _assert_engines_agree(tokenizer, texts: list[str], monkeypatch, tmp_path) -> None:
    from dolphin_train.data import fast_bpe

    monkeypatch.setattr(fast_bpe, "_cache_dir", lambda: tmp_path)
    for attempt in ("found", "from the cache"):
        fast = fast_bpe.FastBPE.from_tokenizer(tokenizer)
        assert fast is not None, attempt
        expected = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        got = fast.encode_batch(texts)
        differing = [t for t, a, b in zip(texts, got, expected, strict=True) if a != b]
        assert differing == [], (attempt, differing[:3])


def test_fast_bpe_never_produces_a_token_the_merges_cannot_reach(llama3, monkeypatch, tmp_path) -> None:
    """ " Việt" is one Llama-3 token, but the Hugging Face BPE (ignore_merges off) gives " Vi", "ệ", "t"."""
    tok = llama3.tokenizer
    assert tok(" Việt", add_special_tokens=False)["input_ids"] == [11655, 26298, 83]
    _assert_engines_agree(tok, HARD_TEXTS + _property_texts(0, 3000), monkeypatch, tmp_path)


def test_fast_bpe_honours_ignore_merges(llama3_dir, monkeypatch, tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_dir)
    tok.backend_tokenizer.model.ignore_merges = True  # as in Meta's own Llama-3 tokenizer.json
    assert tok(" Việt", add_special_tokens=False)["input_ids"] == [101798]
    _assert_engines_agree(tok, HARD_TEXTS + _property_texts(1, 1000), monkeypatch, tmp_path)


@pytest.mark.parametrize("style", ["gpt2", "qwen"])
def test_fast_bpe_agrees_on_other_byte_level_bpes(style, monkeypatch, tmp_path) -> None:
    tok = _gpt2_style_tokenizer(style)
    assert tok(" unreachable", add_special_tokens=False)["input_ids"] != [tok.convert_tokens_to_ids("Ġunreachable")]
    _assert_engines_agree(tok, [" unreachable", *HARD_TEXTS, *_property_texts(2, 2000)], monkeypatch, tmp_path)
