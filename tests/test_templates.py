"""Named chat templates: the same rows as axolotl 0.19 for the same conversations, and the rules around them.

The reference rows in fixtures/axolotl_templates.json are axolotl's own output (`scripts/template_parity.py
--fixture`, which also compares 300 conversations per template): three conversations per template, with system
prompts, several turns, whitespace at content edges, non-ASCII text, and tool turns where the format has them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, sharegpt, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.schema import TEMPLATE_NAMES
from dolphin_train.data.encode import IGNORE_INDEX, ConversationEncoder
from dolphin_train.data.formats import RowConverter
from dolphin_train.data.named_templates import NAMED_TEMPLATES
from dolphin_train.data.prepare import prepare_data, template_for
from dolphin_train.data.templates import TokenizerTemplate
from dolphin_train.errors import DataError
from dolphin_train.model.tokenizer import load_tokenizer

FIXTURE = json.loads((REPO / "tests/fixtures/axolotl_templates.json").read_text())
BOS = 128000


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, llama3_dir: str):
    """The parity script's tokenizers: the real Llama-3 tokenizer plus each format's special tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    made: dict[tuple[str, ...], str] = {}

    def build(tokens: list[str]) -> str:
        if tuple(tokens) not in made:
            out = tmp_path_factory.mktemp("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
            if tokens:
                tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
            tokenizer.save_pretrained(str(out))
            made[tuple(tokens)] = str(out)
        return made[tuple(tokens)]

    return build


def _config(tmp_path: Path, base: str, rows: list, **keys):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    dataset = {"path": str(data), "type": "chat_template", **keys.pop("dataset", {})}
    raw = {"base_model": base, "datasets": [dataset], "dataset_prepared_path": str(tmp_path / "prepared"),
           "sequence_len": 8192, **keys}  # fmt: skip
    return validate_mapping(raw)


def _prepare(cfg):
    loaded = load_tokenizer(cfg)
    return loaded, prepare_data(cfg, loaded.tokenizer)


def _encode(cfg, tokenizer, rows: list) -> list[tuple[list[int], list[int]]]:
    """What `prepare_data` makes of these rows, without its caching and Arrow machinery (fast)."""
    canonical = [RowConverter(cfg.datasets[0], None, False)(row) for row in rows]
    batch = {k: [c[k] for c in canonical] for k in canonical[0]}
    encoder = ConversationEncoder(tokenizer, cfg.sequence_len, False, False, template_for(cfg, tokenizer))
    out = encoder(batch)
    return [(list(i), list(lab)) for i, lab in zip(out["input_ids"], out["labels"], strict=True)]


def test_every_named_template_is_a_chat_template_value() -> None:
    assert set(TEMPLATE_NAMES) == {"chatml", *NAMED_TEMPLATES}


@pytest.mark.parametrize("case", sorted(FIXTURE))
def test_rows_are_axolotls(case: str, tmp_path: Path, tokenizer_dirs) -> None:
    entry = FIXTURE[case]
    name = entry["template"] or case
    rows = [{"messages": r["messages"]} for r in entry["rows"]]
    cfg = _config(tmp_path, tokenizer_dirs(entry["tokens"]), rows, chat_template=name)
    loaded = load_tokenizer(cfg)
    assert loaded.new_token_ids == []
    assert loaded.tokenizer.chat_template == NAMED_TEMPLATES[name].jinja  # saved with the model: inference agrees
    ours = _encode(cfg, loaded.tokenizer, rows)
    assert ours == [(r["input_ids"], r["labels"]) for r in entry["rows"]]


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_trained_text_is_the_answers_and_their_end_tokens(name: str, tmp_path: Path, llama3_dir: str) -> None:
    """Whatever the format, with a tokenizer that lacks its markers (they are added): what is trained is each
    answer and the end-of-turn token the format writes after it, nothing of the headers."""
    answers = ["Four.", "It is 2 + 2 = 4, as\nbefore."]
    turns = [("human", "What is 2+2?"), ("gpt", answers[0]), ("human", "Again?"), ("gpt", answers[1])]
    cfg = _config(tmp_path, llama3_dir, [sharegpt(*turns)], chat_template=name, dataset={"type": "sharegpt"})
    tokenizer = load_tokenizer(cfg).tokenizer
    for marker in NAMED_TEMPLATES[name].markers:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    [(ids, labels)] = _encode(cfg, tokenizer, [sharegpt(*turns)])
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    end = NAMED_TEMPLATES[name].end_tokens[0].replace("{eos}", tokenizer.eos_token)
    assert tokenizer.decode(trained).replace(" ", "") == "".join(a + end for a in answers).replace(" ", "")
    messages = [
        {"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, [t for _, t in turns], strict=True)
    ]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_the_template_writes_bos_plain_text_keeps_it(tmp_path: Path, llama3_dir: str) -> None:
    """A Jinja template decides BOS as `apply_chat_template` does (Phi-3.5 writes none, Llama 3 one);
    completion rows start with BOS where the tokenizer adds it."""
    chat = [sharegpt(("human", "Hi"), ("gpt", "Hello."))]
    for name, first in (("phi_35", False), ("llama3", True)):
        cfg = _config(tmp_path / name, llama3_dir, chat, chat_template=name, dataset={"type": "sharegpt"})
        ids = list(_prepare(cfg)[1].train[0]["input_ids"])
        assert (ids[0] == BOS) is first and ids.count(BOS) == int(first)
    cfg = _config(tmp_path / "text", llama3_dir, [{"text": "Plain text."}], chat_template="phi_35",
                  dataset={"type": "completion"})  # fmt: skip
    assert _prepare(cfg)[1].train[0]["input_ids"][0] == BOS


def test_a_turn_the_template_rewrites_is_located_by_difference(llama3_dir: str) -> None:
    """Llama 3.2 writes tool results as JSON strings: the splice cannot reproduce that, so each turn is found
    by rendering with it replaced; the tool turn's span is its text as the template wrote it (escaped, inside the
    template's quotes)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    tokenizer.chat_template = NAMED_TEMPLATES["llama3_2"].jinja
    template = TokenizerTemplate(tokenizer, ["<|eot_id|>"])
    roles, contents = ["user", "assistant", "tool", "assistant"], [" Weather? ", "Checking.", 'say "hi"', "Sunny."]
    rendered = template.render(roles, contents, [False, True, True, True], [False, True, False, True])
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    assert rendered.text == tokenizer.apply_chat_template(messages, tokenize=False)
    spans = [rendered.text[a:b] for a, b in rendered.trained_spans]
    assert spans == ["Checking.<|eot_id|>", json.dumps('say "hi"')[1:-1], "Sunny.<|eot_id|>"]


def test_a_row_the_template_rejects_names_its_line(tmp_path: Path, llama3_dir: str) -> None:
    rows = [sharegpt(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."))]
    cfg = _config(tmp_path, llama3_dir, rows, chat_template="gemma", dataset={"type": "sharegpt"})
    with pytest.raises(DataError, match=r"data.jsonl:1: the chat template rejected it: the gemma chat template has no"):
        _prepare(cfg)


def test_mistral_v3_puts_the_system_text_in_the_last_user_turn(llama3_dir: str) -> None:
    """As the format intends for a served prompt; axolotl's copy drops the system text from training rows that
    end with an answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"}]  # fmt: skip
    text = tokenizer.apply_chat_template(messages, chat_template=NAMED_TEMPLATES["mistral_v3_tekken"].jinja,
                                         tokenize=False)  # fmt: skip
    assert text == "<|begin_of_text|>[INST]a[/INST]b<|end_of_text|>[INST]S\n\nc[/INST]d<|end_of_text|>"


def test_dates_in_published_formats_are_fixed(llama3_dir: str) -> None:
    """Llama 3.2 and Mistral Small 3 write "today" into the prompt: fixed here so that preparing the same data
    gives the same tokens every day; `date_string` changes it at inference."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    messages = [{"role": "user", "content": "a"}]

    def render(name: str, **kw) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=NAMED_TEMPLATES[name].jinja, tokenize=False, **kw)

    assert "Today Date: 26 Jul 2024\n\n<|eot_id|>" in render("llama3_2")
    assert "Today Date: 01 Jan 2026" in render("llama3_2", date_string="01 Jan 2026")
    assert "The current date is 2025-01-30." in render("mistral_v7_tekken")


def test_chat_template_default_follows_axolotl(tmp_path: Path, llama3_dir: str) -> None:
    messages = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    cfg = _config(tmp_path / "a", llama3_dir, messages)
    assert cfg.chat_template is None and cfg.template_name == "tokenizer_default"
    with pytest.raises(DataError, match=r"tokenizer_default \(the default for `type: chat_template` rows"):
        _prepare(cfg)  # this tokenizer has no template of its own
    sharegpt_cfg = _config(tmp_path / "b", llama3_dir, [sharegpt(("human", "Hi"), ("gpt", "Hello."))],
                           dataset={"type": "sharegpt"})  # fmt: skip
    assert sharegpt_cfg.template_name == "chatml"
    fallback = _config(tmp_path / "c", llama3_dir, messages, chat_template="tokenizer_default_fallback_llama3")
    loaded, prepared = _prepare(fallback)
    assert loaded.template == "llama3" and loaded.tokenizer.chat_template == NAMED_TEMPLATES["llama3"].jinja
    assert prepared.report.kept == 1


def test_eot_tokens_choose_the_trained_end_token(tmp_path: Path, llama3_dir: str) -> None:
    rows = [sharegpt(("human", "Hi"), ("gpt", "Hello."))]
    keys = {"chat_template": "phi_3", "dataset": {"type": "sharegpt"}}
    default = _prepare(_config(tmp_path / "a", llama3_dir, rows, **keys))
    chosen = _prepare(_config(tmp_path / "b", llama3_dir, rows, eot_tokens=["<|assistant|>"], **keys))

    def trained(result) -> str:
        row = result[1].train[0]
        return result[0].tokenizer.decode([i for i, lab in zip(row["input_ids"], row["labels"], strict=True)
                                           if lab != IGNORE_INDEX])  # fmt: skip

    assert trained(default) == "Hello.<|end|>"
    assert trained(chosen) == "Hello."  # <|end|> is no end-of-turn token now; <|assistant|> never follows an answer
    with pytest.raises(DataError, match="eot_tokens: 'two words' is not a single token"):
        _prepare(_config(tmp_path / "c", llama3_dir, rows, eot_tokens=["two words"], **keys))


def test_gemma4_prompts_thinking_and_tool_turns(tmp_path: Path, llama3_dir: str) -> None:
    """Gemma 4's published prompt format: a served prompt opens an empty thought block unless thinking is asked
    for (then `<|think|>` heads the system turn); an answer's thought block is left out of the history; a plain
    tool turn has no place in the format (results go inside the calling model turn) and is refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    jinja = NAMED_TEMPLATES["gemma4"].jinja

    def render(messages: list[dict], **kw) -> str:
        text = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, **kw)
        return text.removeprefix("<|begin_of_text|>")

    chat = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"},
            {"role": "assistant", "content": "<|channel>thought\nsay hi<channel|>\nHello."}]  # fmt: skip
    assert render(chat) == "<|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
    prompt = render(chat[1:2], add_generation_prompt=True)
    assert prompt == "<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    thinking = render(chat[1:2], add_generation_prompt=True, enable_thinking=True)
    assert thinking == "<|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Let me look."},
                          {"role": "tool", "content": "42"}, {"role": "assistant", "content": "42."}]}]  # fmt: skip
    cfg = _config(tmp_path, llama3_dir, rows, chat_template="gemma4")
    with pytest.raises(DataError, match="writes tool results inside the model turn"):
        _prepare(cfg)
