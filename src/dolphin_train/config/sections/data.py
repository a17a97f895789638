"""The data keys: datasets and their row formats, the chat template, sequence length and packing, the cache."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import field_validator, model_validator

from dolphin_train.config.keys import Section, Strict, key

# `chat_template` values: ChatML, the tokenizer's own template, and the named formats of named_templates.py
# (listed here so that validating a config needs no import of the data stage; a test checks they agree).
TEMPLATE_NAMES = (
    "chatml",
    "llama3",
    "llama3_2",
    "llama4",
    "gemma",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4_unified",
    "phi_3",
    "phi_35",
    "qwen_25",
    "qwen3",
    "deepseek_v2",
    "mistral_v1",
    "mistral_v3_tekken",
    "mistral_v7_tekken",
    "cohere",
    "falcon_h1",
)
TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"


class DatasetConfig(Strict):
    """One entry of `datasets:`."""

    path: str = key(
        ...,
        "A local file (`.jsonl`, `.json`, `.parquet`, `.csv`, `.arrow`), a directory or glob of such files, or a "
        "Hugging Face hub dataset id (loaded with `datasets.load_dataset`).",
        "data",
    )
    type: Literal["sharegpt", "chat_template", "alpaca", "alpaca:chat", "alpaca:phi", "completion"] = key(
        "sharegpt",
        "Row format. `sharegpt`: a `conversations` list of `{from, value}` turns. `chat_template`: a `messages` "
        "list of `{role, content}` turns (OpenAI style). `alpaca`: `instruction`, optional `input`, `output`, "
        "optional `system`, trained as a one-turn conversation in the run's `chat_template`; `alpaca:chat` and "
        "`alpaca:phi` (axolotl's spellings that also pick a fixed text prompt) read the same rows the same way: "
        "the chat template formats them, so the model is trained in the format it is served with. `completion`: "
        "raw text in `field`, every token trained.",
        "data",
    )
    conversation: Literal["chatml"] = key(
        "chatml", "Prompt format for `sharegpt` rows (axolotl 0.4 key); only `chatml`.", "data"
    )
    ds_type: Literal["json", "parquet", "csv", "arrow"] | None = key(
        None, "File type, when the extension does not say it.", "data"
    )
    data_files: str | list[str] | None = key(
        None, "Files to load inside `path` (a directory or a hub dataset).", "data"
    )
    split: str = key("train", "Split to load from a hub dataset.", "data")
    name: str | None = key(None, "Configuration name of a hub dataset.", "data")
    field_messages: str | None = key(
        None,
        "Column holding the turns (default: `conversations` for sharegpt, `messages` for chat_template).",
        "data",
    )
    message_property_mappings: dict[str, str] | None = key(
        None,
        "Keys of each turn: `{role: ..., content: ...}` (default `from`/`value` for sharegpt, "
        "`role`/`content` for chat_template).",
        "data",
    )
    message_field_role: str | None = key(
        None, "Deprecated axolotl spelling of `message_property_mappings: {role: ...}`.", "data"
    )
    message_field_content: str | None = key(
        None, "Deprecated axolotl spelling of `message_property_mappings: {content: ...}`.", "data"
    )
    roles: dict[str, list[str]] | None = key(
        None,
        "Role names in the data for each role (`system`, `user`, `assistant`, `tool`), e.g. "
        "`{user: [human, user], assistant: [gpt, bot]}`; replaces the default mapping.",
        "data",
    )
    field: str | None = key(None, "Column holding the text of `completion` rows (default `text`).", "data")
    roles_to_train: list[Literal["system", "user", "assistant", "tool"]] = key(
        ["assistant"], "Roles whose turns are trained.", "data"
    )
    train_on_eos: Literal["turn", "last", "all", "none"] = key(
        "turn",
        "Which end-of-turn tokens are trained: `turn` those closing a trained turn, `last` only the last one, "
        "`all` every turn's, `none` no end-of-turn token.",
        "data",
    )
    drop_system_message: bool = key(False, "Remove system turns from this dataset's conversations.", "data")

    @model_validator(mode="after")
    def _one_spelling_per_field(self) -> DatasetConfig:
        mapped = self.message_property_mappings or {}
        for name, old in (("role", self.message_field_role), ("content", self.message_field_content)):
            if old is not None and mapped.get(name, old) != old:
                raise ValueError(
                    f"message_field_{name}: {old!r} and message_property_mappings.{name}: {mapped[name]!r} "
                    "disagree; keep message_property_mappings"
                )
        return self

    @property
    def property_mappings(self) -> dict[str, str]:
        """Keys of each turn, merging the deprecated `message_field_*` spellings."""
        old = {"role": self.message_field_role, "content": self.message_field_content}
        return {**{k: v for k, v in old.items() if v is not None}, **(self.message_property_mappings or {})}


class DataKeys(Section):
    """The training data, how it is formatted, masked, cut and packed."""

    datasets: list[DatasetConfig] = key(..., "Training data, mixed together.", "data", min_length=1)
    chat_template: str | None = key(
        None,
        "Template that turns conversations into tokens, saved with the tokenizer: `chatml`; a model family's "
        "published format: " + ", ".join(f"`{n}`" for n in TEMPLATE_NAMES[1:]) + "; `tokenizer_default`: the "
        "tokenizer's own Jinja template; or `tokenizer_default_fallback_NAME`: the tokenizer's, else NAME. Same "
        "masking rule for all. Default, as in axolotl: `tokenizer_default` when a dataset has `type: "
        "chat_template`, else `chatml`.",
        "data",
    )
    eot_tokens: list[str] | None = key(
        None,
        "End-of-turn tokens trained after each trained turn, where the template writes one right after the "
        "content (default: the named template's own, e.g. `<|eot_id|>`, `<end_of_turn>`; for "
        "`tokenizer_default`, any added token). Each must be a single token.",
        "data",
    )
    push_dataset_to_hub: str | None = key(
        None, "Upload the prepared data to the hub.", "data", unsupported=True,
        alternative="the prepared data is a local cache (dataset_prepared_path)",
    )  # fmt: skip
    max_packed_sequence_len: int | None = key(
        None, "axolotl's old packing length.", "data", unsupported=True,
        alternative="sample_packing: true with sequence_len",
    )  # fmt: skip
    default_system_message: str | None = key(None, "System message added to conversations that have none.", "data")
    skip_invalid_rows: bool = key(
        False,
        "Drop malformed rows (counted per reason) instead of failing before tokenization.",
        "data",
    )
    dataset_exact_deduplication: bool = key(
        False,
        "Drop every row whose tokens and labels repeat an earlier row's exactly (as axolotl: after tokenization, "
        "before the evaluation split, so no evaluation row repeats a training row); counted in the report.",
        "data",
    )
    special_tokens_in_content: bool = key(
        False,
        "Whether special-token text inside a message (`<|im_end|>`, `<|eot_id|>`, the BOS/EOS strings...) becomes "
        "the special token. By default it is tokenized as ordinary text, so only the chat template writes turn "
        "markers (scraped text holds such strings); rows that held some are counted in the preparation report. "
        "`true` keeps them as tokens, for data that means them.",
        "data",
    )
    shuffle_merged_datasets: bool = key(
        True,
        "Shuffle the mixed datasets with `seed` (not with `curriculum_sampling`, which keeps their order).",
        "data",
    )
    dataset_prepared_path: str = key(
        "last_run_prepared",
        "Directory for the tokenized-data cache; each preparation lives in a subdirectory named by a "
        "fingerprint of the data files' contents, the tokenizer and the keys that change tokens.",
        "data",
    )
    dataset_num_proc: int | None = key(
        None, "Processes used for tokenization (default: the number of CPU cores, at most 8).", "data", ge=1
    )
    val_set_size: float = key(
        0.0,
        "Held-out evaluation set: a fraction of the rows (0 < x < 1) or a number of rows (x >= 1); split with `seed`.",
        "data",
        ge=0,
    )
    sequence_len: int = key(2048, "Maximum tokens per training row.", "data", ge=16)
    excess_length_strategy: Literal["drop", "truncate"] = key(
        "drop",
        "What happens to a conversation longer than `sequence_len`: `drop` it, or `truncate` it to "
        "`sequence_len` tokens. Either way it is counted and reported.",
        "data",
    )
    train_on_inputs: bool = key(
        False, "Train on every token (system and user turns included), not only assistant turns.", "data"
    )
    sample_packing: bool = key(
        False,
        "Pack several conversations into each row of `sequence_len` tokens (position ids restart per "
        "conversation; attention never crosses conversations).",
        "data",
    )
    sample_packing_sequentially: bool = key(
        False,
        "Pack by next fit in dataset order (each conversation joins the current row, or starts a new one when "
        "it does not fit) instead of best fit by length: conversations keep their order within and across "
        "rows, for a few percent more rows. With `curriculum_sampling`, training sees the data in file order.",
        "data",
    )
    curriculum_sampling: bool = key(
        False,
        "Train on the rows in dataset order, not shuffled (curriculum learning): the datasets are not "
        "shuffled when mixed (the held-out split keeps the order too) and the Trainer reads rows in order. "
        "With `sample_packing`, needs `sample_packing_sequentially` (best-fit packing reorders the rows).",
        "data",
    )
    eval_sample_packing: bool | None = key(
        None, "Pack the evaluation set too (default: same as `sample_packing`).", "data"
    )
    pad_to_sequence_len: bool = key(
        False, "Pad every row to exactly `sequence_len` tokens (stable memory use and kernel shapes).", "data"
    )
    group_by_length: bool = key(False, "Batch rows of similar length.", "data", unsupported=True)

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        name = value.removeprefix(FALLBACK_PREFIX) if value else value
        if value is None or value == TOKENIZER_DEFAULT or name in TEMPLATE_NAMES:
            return value
        names = ", ".join((*TEMPLATE_NAMES, TOKENIZER_DEFAULT))
        close = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ValueError(f"unknown chat template{hint}; known: {names}")

    @field_validator("val_set_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a count of rows (>= 1) must be a whole number; a fraction must be below 1")
        return value

    @property
    def template_name(self) -> str:
        """The chat template, with axolotl's default: the tokenizer's own for `type: chat_template` rows."""
        if self.chat_template:
            return self.chat_template
        return TOKENIZER_DEFAULT if any(d.type == "chat_template" for d in self.datasets) else "chatml"

    @property
    def eval_packing(self) -> bool:
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing
