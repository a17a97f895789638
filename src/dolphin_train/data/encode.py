"""Canonical rows → token ids and labels, with the masking rule of the README's "Data" section.

Why our own code: the mask is where fine-tuning tools ship silent bugs. Each conversation is rendered
once and tokenized once (batched, in Rust) with character offsets; a token is trained when its
characters overlap a trained span. One pass per conversation, and exactly the token ids the serving
stack produces for the same text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dolphin_train.data.formats import COMPLETION
from dolphin_train.data.templates import IM_END, IM_START, ChatMLTemplate, Template, render_completion

IGNORE_INDEX = -100

# Row status after encoding, counted in the preparation report.
KEPT, TRUNCATED, TOO_LONG, NO_TRAINABLE = 0, 1, 2, 3


def trained_token_mask(offsets: np.ndarray, spans: list[tuple[int, int]], text_len: int) -> np.ndarray:
    """True for tokens whose character range overlaps a trained span (prefix sums: O(chars + tokens))."""
    if len(offsets) == 0:
        return np.zeros(0, dtype=bool)
    marks = np.zeros(text_len + 1, dtype=np.int32)
    for start, end in spans:
        marks[start] += 1
        marks[end] -= 1
    inside = np.cumsum(marks[:-1]) > 0
    prefix = np.concatenate(([0], np.cumsum(inside, dtype=np.int64)))
    return (prefix[offsets[:, 1]] - prefix[offsets[:, 0]]) > 0


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether plain `tokenizer(text)` starts with BOS (Llama-3 does): then training rows start with it
    too, exactly as the prompt a server builds from the saved chat template."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def check_chatml_tokens(tokenizer: Any) -> None:
    for token in (IM_START, IM_END):
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"{token} is not a single token of this tokenizer; add it under `tokens:`")


class ConversationEncoder:
    """Batched encoder used inside `datasets.map` (it pickles to worker processes)."""

    def __init__(
        self,
        tokenizer: Any,
        sequence_len: int,
        train_on_inputs: bool,
        truncate: bool,
        template: Template | None = None,
    ) -> None:
        self.template = template or ChatMLTemplate()
        if isinstance(self.template, ChatMLTemplate):
            check_chatml_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.sequence_len = sequence_len
        self.train_on_inputs = train_on_inputs
        self.truncate = truncate
        self.bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.bos_text = tokenizer.bos_token or ""

    def render(self, row: dict[str, Any]) -> Any:
        if row["kind"] == COMPLETION:
            return render_completion(row["contents"][0], self.tokenizer.eos_token)
        rendered = self.template.render(row["roles"], row["contents"], row["train"], row["train_end"])
        if self.train_on_inputs:
            return type(rendered)(rendered.text, [(0, len(rendered.text))])
        return rendered

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(batch["contents"])
        rendered = [self.render({k: batch[k][i] for k in batch}) for i in range(n)]
        enc = self.tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "trainable": [], "status": []}
        for ids, offsets, r in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True):
            self._encode_one(np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64), r, out)
        return out

    def _encode_one(self, ids: np.ndarray, offsets: np.ndarray, r: Any, out: dict[str, list[Any]]) -> None:
        trained = trained_token_mask(offsets.reshape(-1, 2), r.trained_spans, len(r.text))
        if self.bos_id is not None and not (self.bos_text and r.text.startswith(self.bos_text)):
            ids = np.concatenate(([self.bos_id], ids))
            trained = np.concatenate(([False], trained))
        # Position 0 is never a prediction target (the loss shifts labels); masking it explicitly also keeps
        # packed rows exact: the last token of one conversation never learns to predict the next one's first.
        trained[0] = False
        labels = np.where(trained, ids, IGNORE_INDEX)
        status = KEPT
        if len(ids) > self.sequence_len:
            if self.truncate:
                ids, labels, status = ids[: self.sequence_len], labels[: self.sequence_len], TRUNCATED
            else:
                status = TOO_LONG
        n_trainable = int((labels != IGNORE_INDEX).sum())
        if status != TOO_LONG and n_trainable == 0:
            status = NO_TRAINABLE
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["trainable"].append(n_trainable)
        out["status"].append(status)
