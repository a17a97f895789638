"""Conversations → ChatML token ids and labels, with the masking rule of the README's "Data" section.

Why our own code: the mask is where fine-tuning tools ship silent bugs. We render each conversation
once, tokenize it once (batched, in Rust) with character offsets, and mark a token as trained when its
characters overlap a trained span. That costs one pass per conversation (no re-rendering of prefixes)
and gives exactly the token ids the serving stack produces for the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dolphin_train.data.formats import ASSISTANT

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IGNORE_INDEX = -100

# The Jinja template saved with the tokenizer, so `apply_chat_template`, vLLM and GGUF converters render
# exactly what training saw (BOS is added by the tokenizer itself, as at training time).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Row status after encoding, counted in the preparation report.
KEPT, TRUNCATED, TOO_LONG, NO_TRAINABLE = 0, 1, 2, 3


@dataclass(frozen=True)
class Rendered:
    text: str
    trained_spans: list[tuple[int, int]]  # [start, end) character ranges whose tokens are trained


def render_chatml(roles: list[str], contents: list[str], train_on_inputs: bool) -> Rendered:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn. Trained: each assistant turn's content
    and the `<|im_end|>` closing it (so the model learns to stop); not its header, not the newline after."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for role, content in zip(roles, contents, strict=True):
        header = f"{IM_START}{role}\n"
        body = f"{content}{IM_END}"
        if role == ASSISTANT:
            start = pos + len(header)
            spans.append((start, start + len(body)))
        parts.append(header + body + "\n")
        pos += len(header) + len(body) + 1
    text = "".join(parts)
    if train_on_inputs:
        spans = [(0, len(text))]
    return Rendered(text, spans)


def trained_token_mask(offsets: np.ndarray, spans: list[tuple[int, int]], text_len: int) -> np.ndarray:
    """True for tokens whose character range overlaps a trained span (prefix sums: O(chars + tokens))."""
    marks = np.zeros(text_len + 1, dtype=np.int32)
    for start, end in spans:
        marks[start] += 1
        marks[end] -= 1
    inside = np.cumsum(marks[:-1]) > 0
    prefix = np.concatenate(([0], np.cumsum(inside, dtype=np.int64)))
    if len(offsets) == 0:
        return np.zeros(0, dtype=bool)
    return (prefix[offsets[:, 1]] - prefix[offsets[:, 0]]) > 0


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether plain `tokenizer(text)` starts with BOS (Llama-3 does): then training rows start with it
    too, exactly as the prompt a server builds from the saved chat template."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


class ChatMLEncoder:
    """Batched encoder used inside `datasets.map` (it pickles to worker processes)."""

    def __init__(self, tokenizer: Any, sequence_len: int, train_on_inputs: bool, truncate: bool) -> None:
        for token in (IM_START, IM_END):
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{token} is not a single token of this tokenizer; add it (`tokens:`)")
        self.tokenizer = tokenizer
        self.sequence_len = sequence_len
        self.train_on_inputs = train_on_inputs
        self.truncate = truncate
        self.bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rendered = [
            render_chatml(r, c, self.train_on_inputs) for r, c in zip(batch["roles"], batch["contents"], strict=True)
        ]
        enc = self.tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "trainable": [], "status": []}
        for ids, offsets, r in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True):
            ids = np.asarray(ids, dtype=np.int64)
            trained = trained_token_mask(
                np.asarray(offsets, dtype=np.int64).reshape(-1, 2), r.trained_spans, len(r.text)
            )
            if self.bos_id is not None:
                ids = np.concatenate(([self.bos_id], ids))
                trained = np.concatenate(([False], trained))
            # Position 0 is never a prediction target (the loss shifts labels); masking it explicitly
            # also keeps packed rows exact: the last token of one conversation never learns to predict
            # the first token of the next.
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
        return out
