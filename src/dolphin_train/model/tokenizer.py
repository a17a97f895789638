"""Load the tokenizer, add the config's tokens, and attach the ChatML chat template."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dolphin_train.config.schema import Config
from dolphin_train.data.templates import CHATML_TEMPLATE, IM_END, IM_START
from dolphin_train.errors import DolphinError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Any
    new_token_ids: list[int]  # ids added to the vocabulary: their embedding rows start at the mean


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


def load_tokenizer(cfg: Config) -> LoadedTokenizer:
    """The base tokenizer plus `special_tokens` and `tokens`. ChatML's two markers are added when the
    config forgot them, with a log line: without them as single tokens the model cannot learn to stop."""
    from tokenizers import AddedToken

    tokenizer = _load_base(cfg)
    before = len(tokenizer)
    special = {name: value for name in SPECIAL_TOKEN_NAMES if (value := getattr(cfg.special_tokens, name))}
    if special:
        tokenizer.add_special_tokens(special)
    wanted = list(cfg.tokens)
    if cfg.chat_template == "chatml":
        missing = [t for t in (IM_START, IM_END) if t not in wanted and t not in tokenizer.get_vocab()]
        if missing:
            log.info("Adding ChatML tokens %s to the tokenizer (chat_template: chatml)", ", ".join(missing))
            wanted += missing
    new = [t for t in wanted if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info(
            "No pad token: using the eos token %r for padding (pad positions are never trained)", tokenizer.eos_token
        )
    # Cleanup rewrites " ." as "." when decoding: wrong for byte-level BPE, and it would corrupt chat output.
    tokenizer.clean_up_tokenization_spaces = False
    if cfg.chat_template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    return LoadedTokenizer(tokenizer, list(range(before, len(tokenizer))))
