"""Canonical rows → token ids and labels, with the masking rule of docs/data.md (its "masking rule" section).

Why our own code: the mask is where fine-tuning tools ship silent bugs. Each conversation is rendered
once and tokenized once (batched, in Rust) with character offsets; a token is trained when its
characters overlap a trained span. One pass per conversation, and exactly the token ids the serving
stack produces for the same text.
"""

from __future__ import annotations

import dataclasses
import json
import re
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


def control_tokens(tokenizer: Any, template: Template) -> list[str]:
    """The vocabulary's structure tokens: its special tokens (BOS, EOS, Llama-3's headers...) and the markers
    the template writes (ChatML's are added as ordinary tokens). Other added tokens (`<think>`...) are words
    that messages may hold."""
    added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    wanted = {text for text, t in added.items() if t.special}
    wanted |= set(getattr(tokenizer, "all_special_tokens", [])) | set(getattr(template, "markers", ()))
    return sorted(wanted & added.keys(), key=len, reverse=True)


class ConversationEncoder:
    """Batched encoder used inside `datasets.map` (it pickles to worker processes).

    Special-token text inside a message is tokenized as text (unless `special_tokens_in_content`): the
    conversation is tokenized as one text, as a server would, except for the rows whose messages hold such
    text (found with a cheap search per message), which are tokenized piece by piece between the markers the
    template wrote, with the structure tokens read as text, as `split_special_tokens` does."""

    def __init__(
        self,
        tokenizer: Any,
        sequence_len: int,
        train_on_inputs: bool,
        truncate: bool,
        template: Template | None = None,
        fast: FastBPE | None = None,
        special_tokens_in_content: bool = False,
    ) -> None:
        self.template = template or ChatMLTemplate()
        if isinstance(self.template, ChatMLTemplate):
            check_chatml_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.sequence_len = sequence_len
        self.train_on_inputs = train_on_inputs
        self.truncate = truncate
        self.bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.eos_text = tokenizer.eos_token
        self.fast = fast
        self.keep_special = special_tokens_in_content
        self.control = control_tokens(tokenizer, self.template)
        self.control_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self.control}
        self.words = {t.content for t in tokenizer.added_tokens_decoder.values()} - set(self.control)
        self.control_re = re.compile("|".join(map(re.escape, self.control))) if self.control else None
        self.prefixes = tuple({t[:2] for t in self.control})  # a fast `in` test before the regex
        self._text_tokenizer: Any = None  # Hugging Face tokenizer reading structure tokens as text

    def __getstate__(self) -> dict[str, Any]:
        # With the fast engine, worker processes never call the Hugging Face tokenizer: not pickling it saves
        # each worker a second of start-up (it travels as its whole JSON).
        return {**self.__dict__, "_text_tokenizer": None, "tokenizer": None if self.fast else self.tokenizer}

    def holds_special_text(self, r: Rendered) -> bool:
        """Whether a message's own text holds a structure token's text."""
        if self.control_re is None:
            return False
        text = r.text
        return any(
            any(text.find(p, start, end) >= 0 for p in self.prefixes) and self.control_re.search(text, start, end)
            for start, end in r.content_spans
        )

    def render(self, row: dict[str, Any]) -> Any:
        if row["kind"] == COMPLETION:
            return render_completion(row["contents"][0], self.eos_text)
        rendered = self.template.render(row["roles"], row["contents"], row["train"], row["train_end"])
        if self.train_on_inputs:
            return dataclasses.replace(rendered, trained_spans=[(0, len(rendered.text))])
        return rendered

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        columns = ("kind", "roles", "contents", "train", "train_end")
        rows = zip(*(batch[c] for c in columns), strict=True)
        canonical = [dict(zip(columns, row, strict=True)) for row in rows]
        rendered: list[Rendered | None] = []
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "trainable": [], "status": []}
        out["problem"], out["special_text"] = [], []
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
                out["special_text"].append(False)
            else:
                ids, trained, add_bos, special_text = next(encoded)
                self._encode_one(ids, trained, r.text, add_bos, out)
                out["special_text"].append(special_text)
        return out

    def _encode_texts(
        self, rendered: list[Rendered], bos: list[bool]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, bool, bool]]:
        """(ids, trained mask, add BOS, held special-token text) per rendered conversation; the rows without
        special-token text in their messages are tokenized as one batch."""
        if not rendered:
            return
        special = [self.holds_special_text(r) for r in rendered]
        whole = [r.text for r, s in zip(rendered, special, strict=True) if self.keep_special or not s]
        batch = iter(self._tokenize_batch(whole))
        for r, b, s in zip(rendered, bos, special, strict=True):
            ids, offsets, in_bytes = next(batch) if self.keep_special or not s else self._tokenize_as_text(r)
            if in_bytes:  # offsets in UTF-8 bytes (fast engine)
                spans = spans_to_bytes(r.text, r.trained_spans)
                size = len(r.text) if r.text.isascii() else len(r.text.encode("utf-8"))
                yield ids, trained_token_mask(offsets, spans, size), b, s
            else:
                yield ids, trained_token_mask(offsets, r.trained_spans, len(r.text)), b, s

    def _tokenize_batch(self, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
        """(ids, offsets, offsets in bytes) per text, with special-token text read as those tokens."""
        if not texts:
            return
        if self.fast is not None:
            # Offsets in UTF-8 bytes, from each token's byte length: no per-token Python objects.
            for ids in self.fast.encode_arrays(texts):
                yield ids, byte_offsets(ids, self.fast.token_bytes), True
            return
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            yield np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2), False

    def _tokenize_as_text(self, r: Rendered) -> tuple[np.ndarray, np.ndarray, bool]:
        """Tokens of a conversation whose messages hold special-token text: the markers the template wrote
        are tokens, the text between them is tokenized with structure tokens read as text."""
        assert self.control_re is not None
        text = r.text
        pieces: list[tuple[int, int, bool]] = []  # (start, end, is a template marker)
        pos = 0
        for m in self.control_re.finditer(text):
            if any(start <= m.start() < end for start, end in r.content_spans):
                continue
            if pos < m.start():
                pieces.append((pos, m.start(), False))
            pieces.append((m.start(), m.end(), True))
            pos = m.end()
        if pos < len(text):
            pieces.append((pos, len(text), False))
        ids: list[int] = []
        if self.fast is not None:
            encoding = self.fast.encoding
            for start, end, marker in pieces:
                piece = text[start:end]
                if marker:
                    ids.append(self.control_ids[piece])
                else:
                    ids += encoding.encode(piece, allowed_special=self.words, disallowed_special=())
            array = np.asarray(ids, dtype=np.int64)
            return array, byte_offsets(array, self.fast.token_bytes), True
        offsets: list[tuple[int, int]] = []
        for start, end, marker in pieces:
            if marker:
                ids.append(self.control_ids[text[start:end]])
                offsets.append((start, end))
                continue
            enc = self.text_tokenizer().encode(text[start:end], add_special_tokens=False)
            ids += enc.ids
            offsets += [(start + a, start + b) for a, b in enc.offsets]
        return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2), False

    def text_tokenizer(self) -> Any:
        """The Rust tokenizer with the structure tokens made special and special tokens read as text (the
        other added tokens still match). Built on first need: a second or two, for rare rows."""
        if self._text_tokenizer is None:
            from tokenizers import Tokenizer

            state = json.loads(self.tokenizer.backend_tokenizer.to_str())
            for token in state["added_tokens"]:
                token["special"] = token["content"] in self.control_ids
            tokenizer = Tokenizer.from_str(json.dumps(state))
            tokenizer.encode_special_tokens = True
            self._text_tokenizer = tokenizer
        return self._text_tokenizer

    @staticmethod
    def _reject(out: dict[str, list[Any]]) -> None:
        empty = np.zeros(0, dtype=np.int32)
        for column, value in (("input_ids", empty), ("labels", empty), ("length", 0), ("trainable", 0)):
            out[column].append(value)
        out["status"].append(REJECTED)

    def _encode_one(
        self, ids: np.ndarray, trained: np.ndarray, text: str, add_bos: bool, out: dict[str, list[Any]]
    ) -> None:
        # Not twice where the text opens with BOS itself (read as the token, not as text inside a message).
        if add_bos and self.bos_id is not None and not (len(ids) and ids[0] == self.bos_id):
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
