"""Every supported row format and source type, with exact ids for the real Llama-3 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import sharegpt, tiny_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.schema import DatasetConfig
from dolphin_train.data.encode import IGNORE_INDEX, ConversationEncoder
from dolphin_train.data.formats import RowConverter, RowProblem
from dolphin_train.data.prepare import prepare_data
from dolphin_train.data.templates import TokenizerTemplate
from dolphin_train.errors import DataError
from dolphin_train.model.tokenizer import load_tokenizer

X = IGNORE_INDEX
BOS, EOT_TEXT, IM_END, IM_START, NL = 128000, 128001, 128257, 128258, 198
USER, ASSISTANT = 882, 78191

# A Llama-3-Instruct style template, as shipped in such tokenizers' tokenizer_config.json.
LLAMA3_INSTRUCT = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _llama3(llama3_dir: str, **keys):
    base = {"base_model": llama3_dir, "datasets": [{"path": "unused.jsonl"}]}
    return load_tokenizer(validate_mapping({**base, **keys})).tokenizer


@pytest.fixture(scope="module")
def chatml_llama3(llama3_dir: str):
    return _llama3(llama3_dir, special_tokens={"eos_token": "<|im_end|>"}, tokens=["<|im_start|>", "<|im_end|>"])


def _encode_rows(tokenizer, rows, dataset: DatasetConfig, template=None, train_on_inputs=False):
    convert = RowConverter(dataset, None, train_on_inputs)
    canon = [convert(r) for r in rows]
    batch = {k: [c[k] for c in canon] for k in canon[0]}
    out = ConversationEncoder(tokenizer, 100_000, train_on_inputs, False, template=template)(batch)
    return [(ids.tolist(), labels.tolist()) for ids, labels in zip(out["input_ids"], out["labels"], strict=True)]


def test_alpaca_row_exact_ids(chatml_llama3) -> None:
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    [(ids, labels)] = _encode_rows(chatml_llama3, [row], DatasetConfig(path="-", type="alpaca"))
    assert ids == [BOS, IM_START, USER, NL, 28573, 311, 8753, 382, 15571, 6693, IM_END, NL,
                   IM_START, ASSISTANT, NL, 82681, IM_END, NL]  # fmt: skip
    assert labels == [X] * 15 + [82681, IM_END, X]


def test_completion_row_trains_every_token_and_ends_with_eos(chatml_llama3) -> None:
    [(ids, labels)] = _encode_rows(chatml_llama3, [{"text": "The quick brown fox."}],
                                   DatasetConfig(path="-", type="completion"))  # fmt: skip
    assert ids == [BOS, 791, 4062, 14198, 39935, 13, IM_END]
    assert labels == [X, 791, 4062, 14198, 39935, 13, IM_END]


def test_tokenizer_default_template_exact_ids(llama3_dir: str) -> None:
    tok = _llama3(llama3_dir, chat_template="tokenizer_default")
    tok.chat_template = LLAMA3_INSTRUCT
    template = TokenizerTemplate(tok)
    assert "<|eot_id|>" in template.end_tokens
    row = {"messages": [{"role": "user", "content": "  Hi "}, {"role": "assistant", "content": "Hello!"}]}
    [(ids, labels)] = _encode_rows(tok, [row], DatasetConfig(path="-", type="chat_template"), template)
    sh, eh, eot, two_nl = 128006, 128007, 128009, 271
    assert ids == [BOS, sh, USER, eh, two_nl, 13347, eot, sh, ASSISTANT, eh, two_nl, 9906, 0, eot]
    assert labels == [X] * 11 + [9906, 0, eot]
    rendered = template.render(["user", "assistant"], ["  Hi ", "Hello!"], [False, True], [False, True])
    assert rendered.text == tok.apply_chat_template(row["messages"], tokenize=False)


def test_sharegpt_tool_roles_and_roles_to_train(chatml_llama3) -> None:
    row = sharegpt(("human", "Weather?"), ("gpt", "call"), ("observation", "sunny"), ("gpt", "Sunny."))
    ds = DatasetConfig(path="-", roles_to_train=["assistant"], train_on_eos="last")
    canon = RowConverter(ds, None, False)(row)
    assert canon["roles"] == ["user", "assistant", "tool", "assistant"]
    assert canon["train"] == [False, True, False, True] and canon["train_end"] == [False, False, False, True]
    [(ids, labels)] = _encode_rows(chatml_llama3, [row], ds)
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != X]
    assert chatml_llama3.decode(trained) == "callSunny.<|im_end|>"


def test_train_on_eos_policies() -> None:
    row = sharegpt(("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d"))
    ends = {p: RowConverter(DatasetConfig(path="-", train_on_eos=p), None, False)(row)["train_end"]
            for p in ("turn", "last", "all", "none")}  # fmt: skip
    assert ends == {
        "turn": [False, True, False, True],
        "last": [False, False, False, True],
        "all": [True, True, True, True],
        "none": [False, False, False, False],
    }


def test_custom_fields_roles_and_system_message_options() -> None:
    ds = DatasetConfig(
        path="-", type="chat_template", field_messages="dialog",
        message_property_mappings={"role": "speaker", "content": "text"},
        roles={"user": ["customer"], "assistant": ["agent"], "system": ["policy"]}, drop_system_message=True,
    )  # fmt: skip
    row = {"dialog": [{"speaker": "policy", "text": "Be nice."}, {"speaker": "customer", "text": "Hi"},
                      {"speaker": "agent", "text": "Hello"}]}  # fmt: skip
    assert RowConverter(ds, None, False)(row)["roles"] == ["user", "assistant"]
    with_default = RowConverter(ds, "You are Dolphin.", False)(row)
    assert with_default["roles"][0] == "system" and with_default["contents"][0] == "You are Dolphin."
    with pytest.raises(RowProblem, match="unknown role 'human'"):
        RowConverter(ds, None, False)({"dialog": [{"speaker": "human", "text": "x"}]})


def _rows(n: int) -> list[dict]:
    return [sharegpt(("human", f"What is {i} + 1?"), ("gpt", f"{i + 1}.")) for i in range(n)]


def test_parquet_csv_arrow_directory_and_glob_sources(tmp_path: Path) -> None:
    import datasets

    flat = [{"instruction": f"Add one to {i}.", "output": str(i + 1)} for i in range(6)]
    table = datasets.Dataset.from_list(flat)
    table.to_parquet(str(tmp_path / "d/a.parquet"))
    table.to_csv(str(tmp_path / "d/b.csv"), index=False)
    arrow_dir = tmp_path / "arrow"
    table.save_to_disk(str(arrow_dir))
    arrow_file = next(arrow_dir.glob("*.arrow"))
    write_jsonl(tmp_path / "d/sub/c.jsonl", flat)
    specs = [
        {"path": str(tmp_path / "d"), "type": "alpaca"},  # a directory: parquet, csv and jsonl inside
        {"path": str(arrow_file), "type": "alpaca"},
        {"path": str(tmp_path / "d/**/*.jsonl"), "type": "alpaca"},  # a glob
    ]
    cfg = validate_mapping(tiny_config(tmp_path, datasets=specs))
    prepared = prepare_data(cfg, load_tokenizer(cfg).tokenizer)
    assert list(prepared.report.rows_read.values()) == [18, 6, 6]
    assert prepared.report.kept == 30


def test_skip_invalid_rows_counts_each_reason(tmp_path: Path) -> None:
    rows = [*_rows(3), "{broken", sharegpt(("human", "no answer")), sharegpt(("human", "x"), ("robot", "y")),
            sharegpt(("human", "q"), ("gpt", "   "))]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = validate_mapping(tiny_config(tmp_path, data, skip_invalid_rows=True))
    prepared = prepare_data(cfg, load_tokenizer(cfg).tokenizer)
    assert prepared.report.skipped_invalid == {
        "invalid JSON": 1, "no assistant turn": 1, "unknown role": 1, "empty content": 1,
    }  # fmt: skip
    assert prepared.report.kept == 3


def test_too_many_problems_are_summarised(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ["{"] * 25)
    cfg = validate_mapping(tiny_config(tmp_path, data))
    with pytest.raises(DataError) as info:
        prepare_data(cfg, load_tokenizer(cfg).tokenizer)
    text = str(info.value)
    assert text.startswith("25 malformed row(s)") and "... and 5 more" in text and text.count("invalid JSON") == 20


def test_mixed_datasets_are_shuffled_with_the_seed(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", _rows(20))
    b = write_jsonl(tmp_path / "b.jsonl", [json.loads(json.dumps(r).replace("What", "Tell")) for r in _rows(20)])
    specs = [{"path": str(a)}, {"path": str(b)}]
    cfg = validate_mapping(tiny_config(tmp_path / "1", datasets=specs))
    tok = load_tokenizer(cfg).tokenizer
    first = prepare_data(cfg, tok)
    again = prepare_data(validate_mapping(tiny_config(tmp_path / "2", datasets=specs)), tok)
    assert first.train["input_ids"] == again.train["input_ids"]
    head = [tok.decode(ids) for ids in first.train["input_ids"][:20]]
    assert any("Tell" in text for text in head) and any("What" in text for text in head)
