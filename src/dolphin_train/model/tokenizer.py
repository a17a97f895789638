"""Load the tokenizer, add the config's tokens, and attach the chat template (ChatML or a named one)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dolphin_train.config.load import missing_local_model
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


def token_ids_said(loaded: LoadedTokenizer, cfg: Config) -> str:
    """Which ids the template's markers and the config's tokens got, for `plan` and `validate`:
    `<|im_start|> 128002 (renamed), <|im_end|> 128003 (renamed)`."""
    overrides = cfg.added_tokens_overrides or {}
    said = []
    for text in dict.fromkeys([*template_markers(loaded.template), *cfg.tokens]):
        token_id = loaded.tokenizer.convert_tokens_to_ids(text)
        how = "renamed" if token_id in overrides else "new" if token_id in loaded.new_token_ids else "existing"
        said.append(f"{text} {token_id} ({how})")
    return ", ".join(said)


def _names_the_generic_class(source: str) -> bool:
    """A local tokenizer whose tokenizer_config.json asks for the generic fast class, which AutoTokenizer
    would give too: loading it directly skips AutoTokenizer's import of torch (seconds, for `preprocess`)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(source) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("tokenizer_class") == "PreTrainedTokenizerFast" and (Path(source) / "tokenizer.json").exists()


def _tokenizer_class(cfg: Config) -> Any:
    import transformers

    if cfg.tokenizer_type == "AutoTokenizer" and _names_the_generic_class(cfg.tokenizer_config or cfg.base_model):
        return transformers.PreTrainedTokenizerFast
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
    missing = missing_local_model("tokenizer_config" if cfg.tokenizer_config else "base_model", source)
    if missing:
        raise DolphinError(missing)
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
    overridden: list[int] = []
    if cfg.added_tokens_overrides:
        tokenizer, overridden = _with_overrides(tokenizer, cfg.added_tokens_overrides, cfg.trust_remote_code)
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
    return LoadedTokenizer(tokenizer, [*overridden, *range(before, len(tokenizer))], template)


def _with_overrides(tokenizer: Any, overrides: dict[int, str], trust_remote_code: bool) -> tuple[Any, list[int]]:
    """The tokenizer with existing tokens renamed (`added_tokens_overrides`): Llama-3's reserved special
    tokens become the ChatML markers, say, so nothing is resized. Done through a saved copy whose token
    strings are rewritten, then loaded again (transformers has no call that renames a token)."""
    import json
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    current = {i: tokenizer.convert_ids_to_tokens(i) for i in overrides if 0 <= i < len(tokenizer)}
    problems = [f"{i}: no such token id (the vocabulary has {len(tokenizer):,})" for i in overrides if i not in current]
    vocab = tokenizer.get_vocab()
    problems += [f"{i}: {text!r} is already token {vocab[text]}" for i, text in overrides.items()
                 if text in vocab and vocab[text] != i]  # fmt: skip
    if problems:
        raise DolphinError("added_tokens_overrides: " + "; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="dolphin-tokenizer-") as work:
        tokenizer.save_pretrained(work)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = Path(work, name)
            if path.exists():
                path.write_text(json.dumps(_renamed(json.loads(path.read_text()), overrides)))
        renamed = AutoTokenizer.from_pretrained(work, trust_remote_code=trust_remote_code)
    for i, text in overrides.items():
        if renamed.convert_tokens_to_ids(text) != i:
            raise DolphinError(f"added_tokens_overrides: {i}: {current[i]!r} is not an added token of this "
                               "tokenizer, so it cannot be renamed; choose one of its reserved tokens")  # fmt: skip
        log.info("Token %d %r now reads %r (added_tokens_overrides)", i, current[i], text)
    return renamed, sorted(overrides)


def _renamed(state: Any, overrides: dict[int, str]) -> Any:
    """tokenizer.json's `added_tokens` list, or tokenizer_config.json's `added_tokens_decoder` map, renamed."""
    for entry in state.get("added_tokens", []):
        if entry.get("id") in overrides:
            entry["content"] = overrides[entry["id"]]
    for key, entry in state.get("added_tokens_decoder", {}).items():
        if int(key) in overrides:
            entry["content"] = overrides[int(key)]
    return state
