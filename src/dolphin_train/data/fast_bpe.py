"""A faster exact tokenizer for byte-level BPE vocabularies (Llama-3, GPT-2 style), through tiktoken.

Why our own code: tokenization is most of the cost of preparing millions of conversations, and
tiktoken's BPE runs about 3x faster than the Hugging Face tokenizer on the same vocabulary. It is only
used for a byte-level BPE without a normalizer, whose pre-tokenizer is one regex and whose added tokens
match literally, and it is exact by construction, not by sampling:

The two BPEs differ in two ways. tiktoken returns a word that is itself a token whole, where the Hugging
Face BPE (unless `ignore_merges` is set) only reaches tokens through its merges; and tiktoken merges two
neighbours whenever their concatenation is a token, ranked by token id, where Hugging Face merges only the
pairs listed in `merges`, ranked by their order. So the engine's ranks hold only the *reachable* tokens,
those the Hugging Face BPE gives whole for their own text (with `ignore_merges`, also every token its
merges cannot bring to two parts, which no word can then reach as a pair). Then the two agree on every
word: a token is formed from the same span of bytes in any word as alone (merges inside a span do not see
the text around it), so two neighbours that concatenate to a reachable token are exactly the pair its own
merges end with; and the merges must rank tokens in id order (checked), so both pick the same pair at
every step. Tokenizers for which that cannot be guaranteed use the Hugging Face tokenizer. `first_disagreement`
stays as a guard on a sample of the data: a disagreement there is a bug.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The pattern byte-level BPE applies when its ByteLevel pre-tokenizer has use_regex: true (GPT-2).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of byte-level BPE's byte→printable-character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _pattern(pre: dict[str, Any] | None) -> str | None:
    """The single regex of a byte-level pre-tokenizer, or None if it is anything else."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in split.get("pattern", {})
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex")
        or byte_level.get("add_prefix_space")
    ):
        return None
    return split["pattern"]["Regex"]


class FastBPE:
    """tiktoken over a Hugging Face byte-level BPE; gives ids and per-token byte lengths."""

    def __init__(self, pattern: str, ranks: dict[bytes, int], specials: dict[str, int], token_bytes: np.ndarray):
        import tiktoken

        self.parts = (pattern, ranks, specials)
        self.left_out = 0  # vocabulary tokens the Hugging Face BPE never produces, left out of the ranks
        self.threads = 0  # 0: tiktoken's default pool; 1: encode in the calling thread (worker processes)
        self.token_bytes = token_bytes  # id -> length of the token in UTF-8 bytes
        self.encoding = tiktoken.Encoding(
            "dolphin-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, serialized: str | None = None) -> FastBPE | None:
        """None when tiktoken is missing or exactness cannot be guaranteed (see the module docstring); the
        reason is logged. `serialized`: the backend's `to_str()`, when the caller already has it."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or importlib.util.find_spec("tiktoken") is None:
            return None
        model = backend.model
        if (
            type(model).__name__ != "BPE"
            or backend.normalizer is not None
            or model.dropout
            or model.byte_fallback
            or model.continuing_subword_prefix
            or model.end_of_word_suffix
            or backend.pre_tokenizer is None
        ):
            return None
        pattern = _pattern(json.loads(backend.pre_tokenizer.__getstate__()))
        added = getattr(tokenizer, "added_tokens_decoder", {})
        if pattern is None or any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values()):
            return None
        vocab = backend.get_vocab(with_added_tokens=False)
        reachable = _cached_reachable(model, vocab, serialized or backend.to_str())
        if reachable is None:
            return None
        # Byte-level characters → the bytes they stand for (str.translate then latin-1: fast in C).
        table = {ord(c): b for c, b in _unicode_to_byte().items()}
        try:
            ranks = {token.translate(table).encode("latin-1"): vocab[token] for token in reachable}
        except UnicodeEncodeError:  # a character outside the byte-level alphabet
            return None
        if len(ranks) != len(reachable) or any(bytes([b]) not in ranks for b in range(256)):
            return None
        specials = {t.content: i for i, t in added.items()}
        size = max([*vocab.values(), *specials.values()]) + 1
        token_bytes = np.zeros(size, dtype=np.int64)
        for token, i in ranks.items():
            token_bytes[i] = len(token)
        for text, i in specials.items():
            token_bytes[i] = len(text.encode("utf-8"))
        try:
            fast = cls(pattern, ranks, specials, token_bytes)
        except Exception:  # a pattern tiktoken's regex engine rejects: use the Hugging Face tokenizer
            return None
        fast.left_out = len(vocab) - len(reachable)
        return fast

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_batch(texts, allowed_special="all")

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids as int64 arrays; in a worker process, straight to NumPy without Python int lists."""
        if self.threads == 1:
            return [self.encoding.encode_to_numpy(t, allowed_special="all").astype(np.int64) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def first_disagreement(self, tokenizer: Any, texts: list[str]) -> str | None:
        """The first of these texts on which the Hugging Face ids differ (a guard run before every
        preparation: by construction there is none), or None."""
        expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
        got = self.encode_batch(texts)
        return next((t for t, a, b in zip(texts, got, expected, strict=True) if a != list(b)), None)

    def __reduce__(self) -> tuple[Any, ...]:
        # tiktoken encodings do not pickle; `datasets.map` workers rebuild them from the parts.
        return (_rebuild, (self.parts, self.token_bytes, self.threads))


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dolphin-train" / "fast_bpe"


def _cached_reachable(model: Any, vocab: dict[str, int], serialized: str) -> list[str] | None:
    """`_reachable_tokens`, kept per tokenizer on disk: finding them takes seconds, once per tokenizer."""
    path = _cache_dir() / f"{hashlib.sha256(serialized.encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(path.read_text())
        left_out = set(saved["left_out"])
        return None if saved["refused"] else [t for t in vocab if vocab[t] not in left_out]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    reachable = _reachable_tokens(model, vocab, _merges(serialized))
    kept = set(reachable or ())
    saved = {"refused": reachable is None, "left_out": sorted(i for t, i in vocab.items() if t not in kept)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved))
    except OSError:  # a read-only home: found again next time
        pass
    return reachable


def _merges(serialized: str) -> list[tuple[str, str]]:
    """The model's merges, in rank order, from the tokenizer's JSON (read once per tokenizer: see the cache)."""
    merges = json.loads(serialized)["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _reachable_tokens(model: Any, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[str] | None:
    """The vocabulary tokens the engine may produce (see the module docstring), or None when the merges do not
    rank tokens in id order (tiktoken ranks by id)."""
    from tokenizers.models import BPE

    ignore_merges = bool(getattr(model, "ignore_merges", False))
    merge_only = BPE(vocab, merges, ignore_merges=False) if ignore_merges else model
    # The Hugging Face BPE of each token's own text: one part when the merges reach it.
    parts = {token: (1 if len(token) == 1 else len(merge_only.tokenize(token))) for token in vocab}
    reachable = {token for token, n in parts.items() if n == 1}
    last_id = -1
    for a, b in merges:  # the merges that produce reachable tokens must come in token id order
        token = a + b
        if token in reachable:
            if vocab[token] < last_id:
                log.info("Not using the fast BPE engine: this tokenizer's merges are not in token id order")
                return None
            last_id = vocab[token]
    if not ignore_merges:
        return sorted(reachable, key=vocab.__getitem__)
    # ignore_merges: every token is looked up whole, as tiktoken does; but a token the merges bring to two
    # parts would also be formed from those two neighbours inside longer words, which Hugging Face never does.
    two_parts = [token for token, n in parts.items() if n == 2]
    if two_parts:
        log.info(
            "Not using the fast BPE engine: with ignore_merges, %d tokens (e.g. %r) cannot be matched exactly",
            len(two_parts), two_parts[0],
        )  # fmt: skip
        return None
    return sorted(vocab, key=vocab.__getitem__)


def _rebuild(parts: tuple[Any, ...], token_bytes: np.ndarray, threads: int) -> FastBPE:
    fast = FastBPE(*parts, token_bytes)
    fast.threads = threads
    return fast


def byte_offsets(ids: np.ndarray, token_bytes: np.ndarray) -> np.ndarray:
    """(n, 2) [start, end) byte offsets of consecutive tokens."""
    ends = np.cumsum(token_bytes[ids])
    return np.stack([ends - token_bytes[ids], ends], axis=1)


def spans_to_bytes(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans → UTF-8 byte spans (identical for ASCII text, the common case)."""
    if text.isascii():
        return spans
    return [(len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))) for s, e in spans]
