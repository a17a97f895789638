#!/usr/bin/env python3
"""Run `dolphin-train validate` over a directory of axolotl example configs and count how many validate.

    python scripts/validate_examples.py AXOLOTL/examples [--families | --only 'llama-3|mistral'] [--all] [-v]

`--families` keeps the model families of the count in docs/axolotl.md (FAMILIES below).

By default only supervised fine-tuning configs of text models are counted: configs with `rl`, `reward_model`,
`process_reward_model`, `pretraining_dataset`, `processor_type` (vision/audio), `qat`, `diffusion`, `ebft` or
`streaming` are left out (`--all` keeps them). A config that fails only because this machine lacks the GPU it
asks for (`tf32: true`, `fp16: true` on a CPU) is counted as validating, and listed as such. The refusals are
tallied by key, so the most common blockers come first.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

NOT_SFT = ("rl", "reward_model", "process_reward_model", "pretraining_dataset", "processor_type", "qat", "diffusion",
           "ebft", "streaming")  # fmt: skip
# Llama 2 and 3, Mistral and Mixtral, Qwen 2 and 3, Gemma, Phi, DeepSeek-V2, Falcon, and the archived Falcon,
# Gemma, Qwen, TinyLlama and OpenLLaMA examples.
FAMILIES = (r"^(llama-2|llama-3/|mistral/|qwen2/|qwen3/|gemma|phi/|deepseek-v2|falcon"
            r"|archived/(falcon|gemma|tiny-llama|openllama-3b|qwen)/)")  # fmt: skip
HARDWARE = ("needs a CUDA GPU", "needs an Ampere or newer NVIDIA GPU")


def is_sft(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return True  # counted, and validate says what is wrong
    return isinstance(data, dict) and not any(data.get(k) for k in NOT_SFT)


def validate(path: Path) -> tuple[str, str]:
    """('ok' | 'hardware' | 'refused', message) from `dolphin-train validate PATH`."""
    from dolphin_train.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    message = err.getvalue().strip()
    if code == 0:
        return "ok", ""
    if code == 1 and any(h in message for h in HARDWARE):
        return "hardware", message.removeprefix("error: ")
    return "refused", message


def refused_keys(message: str) -> list[str]:
    """The keys named by each listed problem (`  - key: ...`)."""
    return [re.split(r"[:\s]", line.strip()[2:], maxsplit=1)[0] for line in message.splitlines()
            if line.strip().startswith("- ")]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--only", help="a regular expression the config's path must match (e.g. 'llama-3|mistral')")
    parser.add_argument("--families", action="store_true", help="--only the families of the count in docs/axolotl.md")
    parser.add_argument("--all", action="store_true", help="count every config, not only text SFT ones")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every refusal in full")
    args = parser.parse_args()
    paths = sorted(p for p in args.directory.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
    only = FAMILIES if args.families else args.only
    if only:
        paths = [p for p in paths if re.search(only, str(p.relative_to(args.directory)))]
    if not args.all:
        paths = [p for p in paths if is_sft(p)]
    import logging

    logging.disable(logging.WARNING)
    results = {p: validate(p) for p in paths}
    tally: collections.Counter[str] = collections.Counter()
    for path, (status, message) in results.items():
        name = path.relative_to(args.directory)
        if status == "refused":
            keys = sorted(set(refused_keys(message))) or [message.splitlines()[0]]
            tally.update(keys)
            print(f"refused   {name}: {message if args.verbose else ', '.join(keys)}")
        elif status == "hardware":
            print(f"ok*       {name} ({message})")
        else:
            print(f"ok        {name}")
    ok = sum(s == "ok" for s, _ in results.values())
    hardware = sum(s == "hardware" for s, _ in results.values())
    total = len(results)
    print(f"\n{ok + hardware} of {total} configs validate ({(ok + hardware) / max(total, 1):.0%}); "
          f"{hardware} of them (ok*) only with a GPU this machine lacks")  # fmt: skip
    if tally:
        print("refused by key: " + ", ".join(f"{k} ({n})" for k, n in tally.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
