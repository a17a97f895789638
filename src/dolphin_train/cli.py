"""`dolphin-train`: the command line.

Imports here stay light (no torch, transformers or pydantic at module level) so that `--help` answers
at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dolphin_train import __version__
from dolphin_train.errors import ConfigError, DolphinError

COMMANDS = ("train", "preprocess", "validate", "inspect")

EPILOG = """\
Any top-level config key can be overridden: dolphin-train CONFIG --learning_rate 1e-5 --num_epochs 2
Multi-GPU / multi-node: accelerate launch -m dolphin_train CONFIG   (or torchrun -m dolphin_train CONFIG)
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("-v", "--verbose", action="store_true", help="more logging, and tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dolphin-train",
        description="Supervised fine-tuning of chat LLMs from one YAML file. "
        "`dolphin-train CONFIG` is `dolphin-train train CONFIG`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dolphin-train {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {
        "train": "prepare the data (or reuse the cache) and train",
        "preprocess": "tokenize, mask and cache the datasets, then print the preparation report",
        "validate": "check the config and print it resolved (defaults shown, `auto` resolved here)",
        "inspect": "show prepared examples with trained tokens highlighted, then length and packing statistics",
    }
    commands = {}
    for name in COMMANDS:
        commands[name] = sub.add_parser(
            name,
            help=helps[name],
            description=helps[name],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(commands[name])
    commands["inspect"].add_argument("--n", type=int, default=3, help="number of examples to show (default 3)")
    commands["inspect"].add_argument("--ids", action="store_true", help="show each token's id")
    return parser


def parse_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs left over by argparse become top-level config overrides."""
    from dolphin_train.config.load import parse_override_value

    overrides: dict[str, Any] = {}
    problems: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) == 2:
            problems.append(f"unexpected argument {item!r} (overrides are written --key value)")
            i += 1
            continue
        name, eq, value = item[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if i + 1 >= len(extra):
                problems.append(f"--{name} needs a value")
                break
            value = extra[i + 1]
            i += 1
        overrides[name] = parse_override_value(value)
        i += 1
    if problems:
        raise ConfigError(problems, source="command line")
    return overrides


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    if not _is_main_process():
        level = logging.WARNING
    handler = RichHandler(show_path=verbose, show_time=False, rich_tracebacks=verbose)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("dolphin_train").setLevel(level)
    if not verbose:
        # bitsandbytes warns at import that optional CPU kernels are missing; it works without them.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # Library chatter (deprecation notices, "loading file..." lines) hides what matters.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=True)


def cmd_validate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import yaml

    from dolphin_train.config.load import load_config
    from dolphin_train.config.resolve import resolve_runtime

    cfg = load_config(args.config, overrides)
    runtime = resolve_runtime(cfg)
    resolved = cfg.model_dump(mode="json", by_alias=True)
    resolved.update(bf16=runtime.bf16, fp16=runtime.fp16, tf32=runtime.tf32)
    print(f"# {args.config}: valid. Defaults filled in; `auto` resolved for this machine.")
    print(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False, allow_unicode=True), end="")
    print(
        f"# this machine: {runtime.device}, attention {runtime.attn_implementation} "
        f"({runtime.attention_note}), {runtime.launcher}"
    )
    for warning in _missing_paths(cfg):
        print(f"# warning: {warning}")
    return 0


def _missing_paths(cfg: Any) -> list[str]:
    """Files the config names that are absent here: fine for `validate` on a laptop, fatal for `train`."""
    from pathlib import Path

    missing = [f"dataset not found here: {d.path}" for d in cfg.datasets if not Path(d.path).exists()]
    if isinstance(cfg.deepspeed, str) and not Path(cfg.deepspeed).exists():
        missing.append(f"deepspeed config not found here: {cfg.deepspeed}")
    return missing


def cmd_preprocess(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from dolphin_train.config.load import load_config
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.model.tokenizer import load_tokenizer
    from dolphin_train.train.run import prepare_on_main_process_first

    cfg = load_config(args.config, overrides)
    tok = load_tokenizer(cfg)
    prepared = prepare_on_main_process_first(cfg, tok, resolve_runtime(cfg))
    if _is_main_process():
        _console().print(prepared.report.table())
        print(f"Prepared data: {prepared.path}" + (" (reused from cache)" if prepared.report.from_cache else ""))
    return 0


def cmd_inspect(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from dolphin_train.config.load import load_config
    from dolphin_train.config.resolve import resolve_runtime
    from dolphin_train.data.inspect import highlighted_example, statistics_table
    from dolphin_train.model.tokenizer import load_tokenizer
    from dolphin_train.train.run import prepare_on_main_process_first

    cfg = load_config(args.config, overrides)
    tok = load_tokenizer(cfg)
    prepared = prepare_on_main_process_first(cfg, tok, resolve_runtime(cfg))
    console = _console()
    for i in range(min(args.n, len(prepared.train))):
        row = prepared.train[i]
        console.rule(f"example {i} ({row['length']} tokens, {row['trainable']} trained: bold green)")
        console.print(highlighted_example(tok.tokenizer, row["input_ids"], row["labels"], args.ids))
    console.print(statistics_table(prepared, cfg.sequence_len, cfg.seed))
    return 0


def cmd_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from dolphin_train.config.load import load_config
    from dolphin_train.train.run import run_training

    cfg = load_config(args.config, overrides)
    console = _console()
    summary = run_training(cfg, show=console.print)
    if summary:
        first, final = summary.get("first_eval_loss"), summary.get("final_eval_loss")
        evals = f"; eval loss {first:.4f} → {final:.4f}" if first is not None else ""
        console.print(
            f"[bold green]Done[/]: {summary['steps']} steps in {summary['train_seconds']}s{evals}. "
            f"Model saved to {cfg.output_dir}"
        )
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], int]] = {
    "train": cmd_train,
    "preprocess": cmd_preprocess,
    "validate": cmd_validate,
    "inspect": cmd_inspect,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "train")  # `dolphin-train CONFIG` is `dolphin-train train CONFIG`
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        return HANDLERS[args.command](args, parse_overrides(extra))
    except DolphinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(run again with -v for the full traceback)", file=sys.stderr)
        return 1
