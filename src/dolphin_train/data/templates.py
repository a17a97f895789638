"""Chat templates: render a canonical conversation to text, and say which characters are trained.

The rendered text is tokenized once, as a whole; masks come from these character spans (see encode.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from dolphin_train.data.formats import RowProblem

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Saved with the tokenizer, so `apply_chat_template`, vLLM and GGUF converters render exactly what
# training saw (BOS is added by the tokenizer itself, as at training time).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Rendered:
    text: str
    trained_spans: list[tuple[int, int]]  # [start, end) character ranges whose tokens are trained
    content_spans: list[tuple[int, int]] = field(default_factory=list)  # where the messages' own text lies


class Template(Protocol):
    writes_bos: bool  # the template writes BOS itself (else the encoder adds it where the tokenizer would)
    markers: tuple[str, ...]  # the structure tokens the template writes (besides the tokenizer's special ones)

    def render(self, roles: list[str], contents: list[str], train: list[bool], train_end: list[bool]) -> Rendered: ...


class ChatMLTemplate:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn. A trained turn trains its content; a trained
    end trains the `<|im_end|>` closing the turn (so the model learns to stop). Never trained: the
    `<|im_start|>{role}\\n` header and the newline after `<|im_end|>`."""

    writes_bos = False
    markers = (IM_START, IM_END)

    def render(self, roles: list[str], contents: list[str], train: list[bool], train_end: list[bool]) -> Rendered:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        located: list[tuple[int, int]] = []
        pos = 0
        for role, content, t, te in zip(roles, contents, train, train_end, strict=True):
            header = f"{IM_START}{role}\n"
            start = pos + len(header)
            end = start + len(content)
            _add_span(spans, start, end, end + len(IM_END), t, te)
            located.append((start, end))
            parts.append(f"{header}{content}{IM_END}\n")
            pos = end + len(IM_END) + 1
        return Rendered("".join(parts), spans, located)


def _add_span(spans: list[tuple[int, int]], start: int, end: int, end_with_eot: int, train: bool, train_end: bool):
    if train:
        spans.append((start, end_with_eot if train_end else end))
    elif train_end and end_with_eot > end:
        spans.append((end, end_with_eot))


SKELETONS_KEPT = 4096  # distinct role sequences remembered per template (a few kB each)


class TokenizerTemplate:
    """A Jinja chat template set on the tokenizer: the tokenizer's own (`chat_template: tokenizer_default`) or a
    named one (`llama3`, `gemma3`... see named_templates.py). The template writes every token, BOS included,
    exactly as `apply_chat_template` does at inference.

    Why our own code: the mask needs to know where each turn's content lies in the rendered text. We render
    the conversation's roles once with placeholder contents (a skeleton, cached by the sequence of roles, so
    most conversations reuse one), find the placeholders and splice the real contents in, so the cost stays
    linear in the conversation. Each placeholder is padded with a whitespace character, so that a template
    that trims a content (`| trim`) shows it on that very turn, and the splice trims the same way. The splice
    is then checked against the template's own rendering of the real conversation; where they differ (a
    template that rewrites a content, like Qwen 3's reasoning blocks or Llama's JSON-quoted tool results),
    each turn is located instead by rendering the conversation with that one content replaced, and taking
    what differs. The end-of-turn token is the first of `end_tokens` that the template writes right after a
    turn's content (by default any token added to the vocabulary, e.g. `<|eot_id|>` for Llama-3-Instruct).
    """

    writes_bos = True
    MARK = "\ue000{}\ue001"  # private-use characters: never in real text, untouched by templates
    PAD = "\u2003"  # whitespace that `trim` removes and that templates never write themselves

    def __init__(self, tokenizer: Any, end_tokens: list[str] | None = None, markers: tuple[str, ...] = ()) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template: tokenizer_default, but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.markers = tuple(dict.fromkeys([*markers, *(end_tokens or ())]))
        if end_tokens is None:
            end_tokens = list(getattr(tokenizer, "get_added_vocab", dict)())
        self.end_tokens = sorted(end_tokens, key=len, reverse=True)
        self._skeletons: dict[tuple[str, ...], str] = {}

    def _apply(self, roles: list[str], contents: list[str]) -> str:
        messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja's TemplateError and the template's own raise_exception
            raise RowProblem("rejected by the chat template", f"the chat template rejected it: {exc}") from None

    def render(self, roles: list[str], contents: list[str], train: list[bool], train_end: list[bool]) -> Rendered:
        real = self._apply(roles, contents)
        spliced = self._splice(roles, contents)
        if spliced is not None and spliced[0] == real:
            text, located = spliced
        else:
            text, located = real, self._locate_by_difference(roles, contents, real)
        spans: list[tuple[int, int]] = []
        for i, (start, end) in enumerate(located):
            eot = next((t for t in self.end_tokens if text.startswith(t, end)), "")
            _add_span(spans, start, end, end + len(eot), train[i], train_end[i])
        return Rendered(text, spans, located)

    def _splice(self, roles: list[str], contents: list[str]) -> tuple[str, list[tuple[int, int]]] | None:
        """(text, content span per turn) from one placeholder rendering, or None when a placeholder is missing
        or repeated (the template drops, reorders or copies a turn: located by difference instead)."""
        pad = self.PAD
        skeleton = self._skeletons.get(tuple(roles))
        if skeleton is None:
            skeleton = self._apply(roles, [f"{pad}{self.MARK.format(i)}{pad}" for i in range(len(roles))])
            if len(self._skeletons) < SKELETONS_KEPT:
                self._skeletons[tuple(roles)] = skeleton
        found = []
        for i in range(len(roles)):
            mark = self.MARK.format(i)
            at = skeleton.find(mark)
            if at < 0 or skeleton.find(mark, at + 1) >= 0:
                return None
            found.append((at, i, mark))
        parts: list[str] = []
        located: list[tuple[int, int]] = [(0, 0)] * len(roles)
        pos = cursor = 0
        for at, i, mark in sorted(found):
            left = at > 0 and skeleton[at - 1] == pad  # kept: the template does not trim this side
            after = at + len(mark)
            right = skeleton.startswith(pad, after)
            head_end = at - 1 if left else at
            if pos > head_end:
                return None
            head = skeleton[pos:head_end]
            text = contents[i]
            text = text if left else text.lstrip()
            text = text if right else text.rstrip()
            parts += [head, text]
            cursor += len(head)
            located[i] = (cursor, cursor + len(text))
            cursor += len(text)
            pos = after + (1 if right else 0)
        parts.append(skeleton[pos:])
        return "".join(parts), located

    def _locate_by_difference(self, roles: list[str], contents: list[str], real: str) -> list[tuple[int, int]]:
        """Each turn's span in `real`: render with that one content replaced by a placeholder; what differs
        from `real` is the turn's content as the template wrote it. One rendering per turn."""
        located = []
        for i in range(len(roles)):
            mark = self.MARK.format(i)
            alt = self._apply(roles, [*contents[:i], mark, *contents[i + 1 :]])
            at = alt.find(mark)
            if at < 0:
                raise RowProblem(
                    "left out by the chat template", f"the chat template leaves out turn {i} ({roles[i]!r})"
                )
            start = at if real.startswith(alt[:at]) else _common_prefix(real, alt)
            tail = alt[at + len(mark) :]
            end = len(real) - len(tail) if real.endswith(tail) else len(real) - _common_suffix(real, alt)
            located.append((start, max(start, end)))
        return located


def _common_prefix(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


def render_completion(text: str, eos_token: str | None) -> Rendered:
    """Raw text, then EOS (so the model learns where a document ends); every token trained."""
    full = text + (eos_token or "")
    return Rendered(full, [(0, len(full))], [(0, len(text))])
