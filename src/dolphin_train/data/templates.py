"""Chat templates: render a canonical conversation to text, and say which characters are trained.

The rendered text is tokenized once, as a whole; masks come from these character spans (see encode.py).
"""

from __future__ import annotations

from dataclasses import dataclass
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


class Template(Protocol):
    def render(self, roles: list[str], contents: list[str], train: list[bool], train_end: list[bool]) -> Rendered: ...


class ChatMLTemplate:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn. A trained turn trains its content; a trained
    end trains the `<|im_end|>` closing the turn (so the model learns to stop). Never trained: the
    `<|im_start|>{role}\\n` header and the newline after `<|im_end|>`."""

    def render(self, roles: list[str], contents: list[str], train: list[bool], train_end: list[bool]) -> Rendered:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for role, content, t, te in zip(roles, contents, train, train_end, strict=True):
            header = f"{IM_START}{role}\n"
            start = pos + len(header)
            end = start + len(content)
            _add_span(spans, start, end, end + len(IM_END), t, te)
            parts.append(f"{header}{content}{IM_END}\n")
            pos = end + len(IM_END) + 1
        return Rendered("".join(parts), spans)


def _add_span(spans: list[tuple[int, int]], start: int, end: int, end_with_eot: int, train: bool, train_end: bool):
    if train:
        spans.append((start, end_with_eot if train_end else end))
    elif train_end and end_with_eot > end:
        spans.append((end, end_with_eot))


class TokenizerTemplate:
    """The tokenizer's own Jinja template (`chat_template: tokenizer_default`).

    Why our own code: the mask needs to know where each turn's content lies in the rendered text. We
    render the conversation once with placeholder contents, find the placeholders, and splice the real
    contents in, so the cost stays linear in the conversation (no re-rendering of growing prefixes). The
    end-of-turn token is the added token the template writes right after a turn's content (`<|eot_id|>`
    for Llama-3-Instruct). Templates that strip contents (`| trim`) are detected once and mirrored.
    """

    MARK = "\ue000{}\ue001"  # private-use characters: never in real text, untouched by templates

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template: tokenizer_default, but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "get_added_vocab", dict)()
        self.end_tokens = sorted(added, key=len, reverse=True)
        probe = self._apply(["user", "assistant"], ["  probe  ", "  probe  "])
        self.trims = "  probe  " not in probe

    def _apply(self, roles: list[str], contents: list[str]) -> str:
        messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja's TemplateError and the template's own raise_exception
            raise RowProblem("rejected by the chat template", f"the chat template rejected it: {exc}") from None

    def render(self, roles: list[str], contents: list[str], train: list[bool], train_end: list[bool]) -> Rendered:
        skeleton = self._apply(roles, [self.MARK.format(i) for i in range(len(roles))])
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = cursor = 0
        for i, content in enumerate(contents):
            mark = self.MARK.format(i)
            at = skeleton.find(mark, pos)
            if at < 0:
                raise RowProblem("rejected by the chat template", f"the chat template dropped turn {i}")
            parts.append(skeleton[pos:at])
            cursor += at - pos
            text = content.strip() if self.trims else content
            parts.append(text)
            start, end = cursor, cursor + len(text)
            cursor = end
            pos = at + len(mark)
            eot = next((t for t in self.end_tokens if skeleton.startswith(t, pos)), "")
            _add_span(spans, start, end, end + len(eot), train[i], train_end[i])
        parts.append(skeleton[pos:])
        return Rendered("".join(parts), spans)


def render_completion(text: str, eos_token: str | None) -> Rendered:
    """Raw text, then EOS (so the model learns where a document ends); every token trained."""
    full = text + (eos_token or "")
    return Rendered(full, [(0, len(full))])
