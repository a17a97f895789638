"""Canonical rows → token ids and labels, with the masking rule of the README's "Data" section.

Why our own code: the mask is where fine-tuning tools ship silent bugs. Each conversation is rendered
once and tokenized once (batched, in Rust) with character offsets; a token is trained when its
characters overlap a trained span. One pass per conversation, and exactly the token ids the serving
stack produces for the same text.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dolphin_train.data.fast_bpe import FastBPE, byte_offsets, spans_to_bytes
from dolphin_train.data.formats import COMPLETION, RowProblem
from dolphin_train.data.templates import IM_END, IM_START, ChatMLTemplate, Rendered, Template, render_completion

IGNORE_INDEX = -100

# Row status after encoding, counted in the preparation report. REJECTED: the chat template cannot format the
# row (Gemma's has no system role, Mistral's needs alternating turns...); its `problem` says why.
KEPT, TRUNCATED, TOO_LONG, NO_TRAINABLE, REJECTED = 0, 1, 2, 3, 4


def trained_token_mask(offsets: np.ndarray, spans: list[tuple[int, int]], text_len: int) -> np.ndarray:
    """True for tokens whose [start, end) range overlaps a trained span. Offsets of consecutive tokens are
    sorted, so each span maps to a slice found by binary search: O(spans * log tokens) per conversation."""
    if len(offsets) == 0:
        return np.zeros(0, dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    if np.any(starts[1:] < starts[:-1]) or np.any(ends[1:] < ends[:-1]):
        return _trained_token_mask_unsorted(offsets, spans, text_len)
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask[np.searchsorted(ends, start, side="right") : np.searchsorted(starts, end, side="left")] = True
    return mask & (ends > starts)


def _trained_token_mask_unsorted(offsets: np.ndarray, spans: list[tuple[int, int]], text_len: int) -> np.ndarray:
    """The same rule with prefix sums over characters, for offsets in no particular order."""
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
        fast: FastBPE | None = None,
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
        self.fast = fast

    def render(self, row: dict[str, Any]) -> Any:
        if row["kind"] == COMPLETION:
            return render_completion(row["contents"][0], self.tokenizer.eos_token)
        rendered = self.template.render(row["roles"], row["contents"], row["train"], row["train_end"])
        if self.train_on_inputs:
            return type(rendered)(rendered.text, [(0, len(rendered.text))])
        return rendered

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        columns = ("kind", "roles", "contents", "train", "train_end")
        rows = zip(*(batch[c] for c in columns), strict=True)
        canonical = [dict(zip(columns, row, strict=True)) for row in rows]
        rendered: list[Rendered | None] = []
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "trainable": [], "status": []}
        out["problem"] = []
        for row in canonical:
            try:
                rendered.append(self.render(row))
                out["problem"].append("")
            except RowProblem as exc:
                rendered.append(None)
                out["problem"].append(str(exc))
        good = [(row, r) for row, r in zip(canonical, rendered, strict=True) if r is not None]
        # Plain text starts with BOS where the tokenizer adds one; a Jinja chat template writes its own.
        bos = [row["kind"] == COMPLETION or not self.template.writes_bos for row, _ in good]
        encoded = iter(self._encode_texts([r for _, r in good], bos))
        for r in rendered:
            if r is None:
                self._reject(out)
            else:
                ids, trained, add_bos = next(encoded)
                self._encode_one(ids, trained, r.text, add_bos, out)
        return out

    def _encode_texts(self, rendered: list[Rendered], bos: list[bool]) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
        """(ids, trained mask, add BOS) per rendered conversation, tokenized as one batch."""
        texts = [r.text for r in rendered]
        if not texts:
            return
        if self.fast is not None:
            # Offsets in UTF-8 bytes, from each token's byte length: no per-token Python objects.
            for ids, r, b in zip(self.fast.encode_arrays(texts), rendered, bos, strict=True):
                offsets = byte_offsets(ids, self.fast.token_bytes)
                spans = spans_to_bytes(r.text, r.trained_spans)
                size = len(r.text) if r.text.isascii() else len(r.text.encode("utf-8"))
                yield ids, trained_token_mask(offsets, spans, size), b
            return
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, r, b in zip(enc["input_ids"], enc["offset_mapping"], rendered, bos, strict=True):
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            yield np.asarray(ids, dtype=np.int64), trained_token_mask(offsets, r.trained_spans, len(r.text)), b

    @staticmethod
    def _reject(out: dict[str, list[Any]]) -> None:
        empty = np.zeros(0, dtype=np.int32)
        for column, value in (("input_ids", empty), ("labels", empty), ("length", 0), ("trainable", 0)):
            out[column].append(value)
        out["status"].append(REJECTED)

    def _encode_one(
        self, ids: np.ndarray, trained: np.ndarray, text: str, add_bos: bool, out: dict[str, list[Any]]
    ) -> None:
        if add_bos and self.bos_id is not None and not (self.bos_text and text.startswith(self.bos_text)):
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
        # int32 halves the cache on disk and the bytes read per step; every vocabulary fits.
        out["input_ids"].append(ids.astype(np.int32))
        out["labels"].append(labels.astype(np.int32))
        out["length"].append(len(ids))
        out["trainable"].append(n_trainable)
        out["status"].append(status)
