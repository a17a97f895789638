"""`dolphin-train chat`: talk to a trained model (full or adapter) in the terminal with its chat template."""

from __future__ import annotations

import sys
from pathlib import Path
from threading import Thread
from typing import Any, TextIO

from dolphin_train.errors import DolphinError
from dolphin_train.model.loftq import has_loftq_base, load_loftq_base


def load_for_chat(path: str | Path) -> tuple[Any, Any]:
    """A saved model directory: a full model, or an adapter (its base is loaded and resized as needed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DolphinError(f"{path} is not a model directory")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise DolphinError(
            f"{path} holds no saved model (no config.json or adapter_config.json): give the output_dir of a finished "
            "run, its config file, or a model directory"
        )
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise DolphinError(f"{path} holds no tokenizer (tokenizer.json): was the run finished?")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if has_loftq_base(path):
        model = _loftq_adapter_model(path, tokenizer)
    elif (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    if not tokenizer.chat_template:
        raise DolphinError(f"{path}: the tokenizer has no chat template")
    return model.eval(), tokenizer


def _loftq_adapter_model(path: Path, tokenizer: Any) -> Any:
    """A LoftQ adapter over its base: the original base model with the adapted layers' weights replaced by the
    quantised ones saved next to the adapter (what it was trained over)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_name = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    try:
        base = AutoModelForCausalLM.from_pretrained(base_name)
    except OSError as exc:
        raise DolphinError(f"cannot load the adapter's base model {base_name!r}: {exc}") from None
    if len(tokenizer) != base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter saved the rows
    load_loftq_base(base, path)
    return PeftModel.from_pretrained(base, str(path))


def reply(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], out: TextIO, max_new_tokens: int, temperature: float
) -> str:
    """Generate one assistant turn, streaming it to `out`; stops at the tokenizer's eos (`<|im_end|>`)."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {
        **inputs,
        "max_new_tokens": max_new_tokens,
        "streamer": streamer,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
        **({"temperature": temperature} if temperature > 0 else {}),
    }
    thread = Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        out.write(piece)
        out.flush()
        pieces.append(piece)
    thread.join()
    out.write("\n")
    return "".join(pieces)


def chat(
    model: Any,
    tokenizer: Any,
    system: str | None,
    prompt: str | None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    out: TextIO | None = None,
) -> None:
    """One answer to `prompt`, or an interactive loop (empty line or Ctrl-D ends it)."""
    out = out or sys.stdout  # looked up now: the stream may have been replaced since import
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
        reply(model, tokenizer, messages, out, max_new_tokens, temperature)
        return
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        out.write("assistant> ")
        answer = reply(model, tokenizer, messages, out, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": answer})
