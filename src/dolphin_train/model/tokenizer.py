"""Load the tokenizer, add the config's tokens, and attach the chat template (ChatML or a named one)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dolphin_train.config.schema import FALLBACK_PREFIX, TOKENIZER_DEFAULT, Config
from dolphin_train.data.named_templates import NAMED_TEMPLATES
from dolphin_train.data.templates import CHATML_TEMPLATE, IM_END, IM_START
from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Any
    new_token_ids: list[int]  # ids added to the vocabulary: their embedding rows start at the mean
    template: str = "chatml"  # the chat template the data is formatted with (a name, or tokenizer_default)


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _tokenizer_class(cfg: Config) -> Any:
    import transformers

    cls = getattr(transformers, cfg.tokenizer_type, None)
    if cls is None or not hasattr(cls, "from_pretrained") or "Tokenizer" not in cfg.tokenizer_type:
        raise DolphinError(
            f"tokenizer_type: {cfg.tokenizer_type!r} is not a transformers tokenizer class "
            "(use AutoTokenizer, or a class such as PreTrainedTokenizerFast)"
        )
    return cls


def _load_base(cfg: Config) -> Any:
    source = cfg.tokenizer_config or cfg.base_model
    if not cfg.tokenizer_use_fast:
        log.info("tokenizer_use_fast: false: using the fast tokenizer anyway (same ids; masking needs its offsets)")
    try:
        tokenizer = _tokenizer_class(cfg).from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DolphinError(f"cannot load the tokenizer from {source!r}: {exc}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DolphinError(
            f"{source}: a fast (Rust) tokenizer is required (tokenizer.json); tokenizer_type "
            f"{cfg.tokenizer_type} gave {type(tokenizer).__name__}"
        )
    return tokenizer


def chosen_template(cfg: Config, tokenizer: Any) -> str:
    """The template this run formats with: `tokenizer_default_fallback_NAME` is the tokenizer's own template
    when it has one, else NAME (as in axolotl)."""
    name = cfg.template_name
    if name.startswith(FALLBACK_PREFIX):
        return TOKENIZER_DEFAULT if getattr(tokenizer, "chat_template", None) else name.removeprefix(FALLBACK_PREFIX)
    return name


def template_markers(name: str) -> tuple[str, ...]:
    """Tokens the template writes that must be single tokens of the vocabulary."""
    if name == "chatml":
        return (IM_START, IM_END)
    return NAMED_TEMPLATES[name].markers if name in NAMED_TEMPLATES else ()


def load_tokenizer(cfg: Config) -> LoadedTokenizer:
    """The base tokenizer plus `special_tokens` and `tokens`. The template's markers (ChatML's
    `<|im_start|>`/`<|im_end|>`, Gemma's `<start_of_turn>`...) are added when the tokenizer lacks them, with a
    log line: split into several tokens they would not mark turns reliably, and an end-of-turn token the
    model cannot produce as one token would never teach it to stop."""
    from tokenizers import AddedToken

    tokenizer = _load_base(cfg)
    before = len(tokenizer)
    special = {name: value for name in SPECIAL_TOKEN_NAMES if (value := getattr(cfg.special_tokens, name))}
    if special:
        tokenizer.add_special_tokens(special)
    wanted = list(cfg.tokens)
    template = chosen_template(cfg, tokenizer)
    vocab = tokenizer.get_vocab()  # built afresh at each call: once here
    missing = [t for t in template_markers(template) if t not in wanted and t not in vocab]
    if missing:
        log.info("Adding tokens %s to the tokenizer (chat_template: %s)", ", ".join(missing), template)
        wanted += missing
    new = [t for t in wanted if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info(
            "No pad token: using the eos token %r for padding (pad positions are never trained)", tokenizer.eos_token
        )
    # Cleanup rewrites " ." as "." when decoding: wrong for byte-level BPE, and it would corrupt chat output.
    tokenizer.clean_up_tokenization_spaces = False
    if template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif template in NAMED_TEMPLATES:
        tokenizer.chat_template = NAMED_TEMPLATES[template].jinja
    return LoadedTokenizer(tokenizer, list(range(before, len(tokenizer))), template)
