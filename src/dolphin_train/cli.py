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

COMMANDS = ("train", "plan", "preprocess", "validate", "inspect", "merge-lora", "chat")
PLAN_DOES_NOT_FIT = 3  # `plan --check`: distinct from 1 (an error) and 2 (bad command line)

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
        "plan": "before launching: parameters, steps, and per-GPU memory (weights, gradients, optimizer, "
        "activations, logits), whether it fits, and the changes that would make it fit, fastest first",
        "preprocess": "tokenize, mask and cache the datasets, then print the preparation report",
        "validate": "check the config and print it resolved (defaults shown, `auto` resolved here)",
        "inspect": "show prepared examples with trained tokens highlighted, then length and packing statistics",
        "merge-lora": "merge the trained LoRA adapter into its base model (safetensors + tokenizer)",
        "chat": "chat with a trained model in the terminal (CONFIG: its output_dir; or a model directory)",
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
        if name not in ("merge-lora", "chat"):
            _add_common(commands[name])
    commands["train"].add_argument(
        "--num-processes", type=int, help="launch this many processes on this machine (wraps torchrun)"
    )
    plan = commands["plan"]
    plan.add_argument("--gpus", type=int, default=None, help="GPUs the run will use (default: WORLD_SIZE or 1)")
    plan.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GB, 48GB, 24GiB (default: this machine's "
                      "GPU, else 80GB)")  # fmt: skip
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                      help="plan a GPU run (default) or a CPU run (process memory)")  # fmt: skip
    plan.add_argument("--max-context", action="store_true",
                      help="find the longest sequence_len that fits (with `auto` memory settings chosen at each "
                      "length)")  # fmt: skip
    plan.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                      help="plan for a GPU machine with (or without) liger-kernel installed, whatever is installed "
                      "here (default: as here; Liger's kernels run by default where installed)")  # fmt: skip
    plan.add_argument("--check", action="store_true",
                      help="exit with status 3 when the run is not expected to fit (for launch scripts)")  # fmt: skip
    commands["inspect"].add_argument("--n", type=int, default=3, help="number of examples to show (default 3)")
    commands["inspect"].add_argument("--ids", action="store_true", help="show each token's id")
    merge = commands["merge-lora"]
    merge.add_argument("config", nargs="?", help="YAML config: base_model, its output_dir as the adapter")
    merge.add_argument("--base", help="base model (id or directory), instead of the config's")
    merge.add_argument("--adapter", help="adapter directory, instead of the config's output_dir")
    merge.add_argument("--out", help="where to write the merged model (default: ADAPTER/merged)")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="merged dtype (default: "
                       "bfloat16 when the config trains in bf16, else float32)")  # fmt: skip
    merge.add_argument("-v", "--verbose", action="store_true", help="more logging, and tracebacks on errors")
    talk = commands["chat"]
    talk.add_argument("target", help="YAML config (chats with its output_dir) or a model directory")
    talk.add_argument("--system", help="system prompt")
    talk.add_argument("--prompt", help="answer this one message and exit (non-interactive)")
    talk.add_argument("--max-new-tokens", type=int, default=256)
    talk.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    talk.add_argument("-v", "--verbose", action="store_true", help="more logging, and tracebacks on errors")
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
        overrides[name] = parse_override_value(value, name)
        i += 1
    if problems:
        raise ConfigError(problems, source="command line")
    return overrides


class StdoutHandler(logging.StreamHandler):
    """Plain lines to standard output as it is when each is logged (a caller may have replaced sys.stdout
    since logging was set up)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def log_handler(verbose: bool, on_terminal: bool) -> logging.Handler:
    """The one handler every log line goes through: the level said once, then the message; the logger's name
    only with -v. On a terminal rich draws the level in its own column; in a log file each message is one
    plain line, never wrapped or padded to a terminal's width."""
    message = "%(name)s: %(message)s" if verbose else "%(message)s"
    if on_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=verbose, show_time=False, rich_tracebacks=verbose)
    else:
        handler = StdoutHandler(sys.stdout)
        message = "%(levelname)-8s " + message
    # Set here, never left to logging.basicConfig: it gives a handler without a formatter its own
    # "LEVEL:name:message", which rich would print after its level column (the level said twice).
    handler.setFormatter(logging.Formatter(message))
    return handler


def setup_logging(verbose: bool) -> None:
    from dolphin_train import terminal
    from dolphin_train.process_group import is_main_process

    terminal.set_verbose(verbose)
    if not verbose and not terminal.bars_wanted():
        # No terminal to redraw them: the hub's download bars would print a line per update.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Other ranks repeat what rank 0 says: only their warnings, unless -v (then each rank logs all).
    level = logging.DEBUG if verbose else logging.INFO if is_main_process() else logging.WARNING
    handler = log_handler(verbose, on_terminal=terminal.bars_wanted())
    # Libraries log their warnings at import and along the way (optional kernels missing, deprecations):
    # only errors reach the console unless -v asks for more.
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR, handlers=[handler], force=True)
    logging.getLogger("dolphin_train").setLevel(level)
    if not verbose:
        # torch's own handler prints the deprecation notices libraries trigger at import (torchao's
        # pytree registrations); torch resets its top logger's level at import, not this one's.
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
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
    from dolphin_train.config.load import load_config

    cfg = load_config(args.config, overrides)  # before the heavy imports: a config error is said at once
    import yaml

    from dolphin_train.config.resolve import resolve_runtime, resolved_settings
    from dolphin_train.recipe import choices_for_this_machine, paths_missing_here

    runtime = resolve_runtime(cfg)
    resolved = resolved_settings(cfg, runtime)
    print(f"# {args.config}: valid. Defaults filled in; `auto` resolved for this machine.")
    print(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False, allow_unicode=True), end="")
    print(
        f"# this machine: {runtime.device}, attention {runtime.attn_implementation} "
        f"({runtime.attention_note}), {runtime.launcher}"
    )
    for line in choices_for_this_machine(cfg, runtime):
        print(f"# {line}")
    for warning in paths_missing_here(cfg):
        print(f"# warning: {warning}")
    return 0


def cmd_preprocess(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from dolphin_train.config.load import load_config
    from dolphin_train.process_group import is_main_process
    from dolphin_train.recipe import open_prepared_data

    _, prepared = open_prepared_data(load_config(args.config, overrides))
    if is_main_process():
        _console().print(prepared.report.table())
        print(f"Prepared data: {prepared.path}" + (" (reused from cache)" if prepared.report.from_cache else ""))
    return 0


def cmd_inspect(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from dolphin_train.config.load import load_config
    from dolphin_train.data.inspect import labelled_example, statistics_table
    from dolphin_train.data.packing import PackingOrder
    from dolphin_train.recipe import open_prepared_data

    cfg = load_config(args.config, overrides)
    tok, prepared = open_prepared_data(cfg)
    console = _console()
    for i in range(min(args.n, len(prepared.train))):
        console.print(labelled_example(tok.tokenizer, prepared.train[i], i, args.ids))
    console.print(statistics_table(prepared, cfg.sequence_len, cfg.seed, PackingOrder.from_config(cfg)))
    return 0


def cmd_plan(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from dolphin_train.config.load import load_config
    from dolphin_train.plan.report import default_gpu_memory, make_plan, parse_memory, render
    from dolphin_train.process_group import world_size

    cfg = load_config(args.config, overrides)
    gpus = args.gpus if args.gpus is not None else world_size()
    if gpus < 1:
        raise ConfigError([f"--gpus {gpus}: at least 1"], source="command line")
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else default_gpu_memory()
    if args.max_context:
        return _print_longest_context(cfg, args.config, gpus, memory, args.device, overrides, args.liger)
    plan = make_plan(cfg, gpus, memory, args.device, args.liger)
    console = _console()
    for part in render(plan):
        console.print(part)
    return PLAN_DOES_NOT_FIT if args.check and not plan.fits else 0


def _refuse_a_run_still_training(adapter: str) -> None:
    """A run training into the adapter's directory writes its adapter when it ends: what is there now is an
    earlier run's, about to be replaced. Its checkpoints (complete as they are saved) can be merged."""
    from dolphin_train.train.run_lock import OutputDirInUse, running_into

    holder = running_into(adapter)
    if holder is not None:
        raise OutputDirInUse(f"{adapter} is the output_dir of a run still training ({holder.described()}): its "
                             "adapter is written when that run ends. Merge then, or merge one of its checkpoints "
                             f"(--adapter {adapter}/checkpoint-N)")  # fmt: skip


def _print_longest_context(cfg: Any, path: str, gpus: int, memory: int, device: str,
                           overrides: dict[str, Any], liger: bool | None) -> int:  # fmt: skip
    from dolphin_train.plan.context import STEP, longest_context
    from dolphin_train.plan.memory import GiB

    found = longest_context(cfg, gpus, memory, device, liger)
    where = f"{gpus} x {memory / 1e9:g} GB GPU" if device == "cuda" else "the CPU"
    console = _console()
    if found.longest is None:
        console.print(f"Not even {STEP:,} tokens per row fit {where}.")
        return 0
    fit = found.longest
    beyond = f" ({found.first_too_long:,} does not)" if found.first_too_long else " (the longest tried)"
    console.print(f"Longest sequence_len that fits {where}: {fit.sequence_len:,} tokens{beyond}, estimated peak "
                  f"{fit.estimate.total / GiB:.1f} GiB of {memory / GiB:.1f} GiB per GPU.")  # fmt: skip
    for reason in fit.reasons:
        console.print(reason)
    chosen = {k: getattr(fit.cfg, k) for k in ("micro_batch_size", "gradient_checkpointing", "activation_offloading",
                                               "tiled_mlp")}  # fmt: skip
    # the command line's own overrides too, so that the command plans this very config
    given = {k: v for k, v in overrides.items() if k != "sequence_len" and k not in chosen}
    given.update({k: v for k, v in chosen.items() if getattr(cfg, k) != v or k in overrides})
    said = " ".join(f"--{k} {str(v).lower()}" for k, v in given.items())
    where_said = (f" --gpus {gpus}" if gpus > 1 else "") + {None: "", True: " --liger", False: " --no-liger"}[liger]
    console.print(f"Plan it: dolphin-train plan {path}{where_said} --gpu-memory {memory / 1e9:g}GB --sequence_len "
                  f"{fit.sequence_len} {said}".rstrip())  # fmt: skip
    return 0


def cmd_merge_lora(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from pathlib import Path

    from dolphin_train.post.merge import load_base, merge_lora

    base, adapter, dtype, quantization, trust = args.base, args.adapter, args.dtype, None, False
    if args.config:
        from dolphin_train.config.load import load_config
        from dolphin_train.post.merge import merge_settings

        settings = merge_settings(load_config(args.config, overrides), args.dtype)
        base, adapter = base or settings.base, adapter or settings.adapter
        dtype, quantization, trust = settings.dtype, settings.quantization, settings.trust_remote_code
    elif overrides:
        raise ConfigError([f"--{k}: config overrides need a CONFIG" for k in overrides], source="command line")
    if not base or not adapter:
        raise ConfigError(["give a CONFIG, or both --base and --adapter"], source="merge-lora")
    _refuse_a_run_still_training(adapter)
    out = Path(args.out) if args.out else Path(adapter) / "merged"
    merge_lora(load_base(base, dtype or "float32", quantization, trust), adapter, out)
    print(f"Merged model: {out}")
    return 0


def cmd_chat(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from pathlib import Path

    from dolphin_train.post.chat import chat, load_for_chat

    target = Path(args.target)
    if target.is_file():
        from dolphin_train.config.load import load_config

        target = Path(load_config(target, overrides).output_dir)
    model, tokenizer = load_for_chat(target)
    chat(model, tokenizer, args.system, args.prompt, args.max_new_tokens, args.temperature)
    return 0


def relaunch_with_torchrun(num_processes: int, argv: Sequence[str]) -> int:
    """`--num-processes N`: run this same command under torchrun, one process per GPU (or CPU worker)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
           "-m", "dolphin_train", *argv]  # fmt: skip
    return subprocess.run(cmd, check=False).returncode


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues an interrupted run: this one, with its overrides, resuming from the latest
    complete checkpoint (a `--resume_from_checkpoint` given before is replaced)."""
    import shlex

    kept, extra = [], list(args.overrides_as_written)
    while extra:
        item = extra.pop(0)
        if item.replace("-", "_").startswith("__resume_from_checkpoint"):
            if "=" not in item and extra:
                extra.pop(0)
            continue
        kept.append(item)
    launch = ["--num-processes", str(args.num_processes)] if args.num_processes else []
    return shlex.join(["dolphin-train", "train", args.config, *launch, *kept, "--resume_from_checkpoint", "auto"])


def cmd_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from rich.markup import escape

    from dolphin_train.config.load import load_config

    cfg = load_config(args.config, overrides)  # checked before any process starts, and before torch loads
    if args.num_processes and "WORLD_SIZE" not in os.environ:
        forwarded = ["train", args.config, *args.overrides_as_written]
        return relaunch_with_torchrun(args.num_processes, forwarded + (["-v"] if args.verbose else []))
    console = _console()
    if cfg.use_ray:
        from dolphin_train.ray_launch import run_with_ray

        summary = run_with_ray(cfg)
    else:
        from dolphin_train.recipe import run_training

        summary = run_training(cfg, show=console.print)
    if summary.get("interrupted"):
        resume = escape(resume_command(args))
        console.print(f"[bold yellow]Stopped[/] at step {summary['steps']}: checkpoint saved in "
                      f"{summary['checkpoint']}. Resume with:\n  {resume}", highlight=False)  # fmt: skip
        return 0
    if summary:
        first, final = summary.get("first_eval_loss"), summary.get("final_eval_loss")
        evals = f"; eval loss {first:.4f} → {final:.4f}" if first is not None else ""
        resumed = f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else ""
        console.print(
            f"[bold green]Done[/]{resumed}: {summary['steps']} steps in {summary['train_seconds']}s{evals}. "
            f"Model saved to {cfg.output_dir}"
        )
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], int]] = {
    "train": cmd_train,
    "plan": cmd_plan,
    "preprocess": cmd_preprocess,
    "validate": cmd_validate,
    "inspect": cmd_inspect,
    "merge-lora": cmd_merge_lora,
    "chat": cmd_chat,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose_first = False
    while argv and argv[0] in ("-v", "--verbose"):  # `dolphin-train -v train CONFIG`: a global flag
        verbose_first = True
        argv.pop(0)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "train")  # `dolphin-train CONFIG` is `dolphin-train train CONFIG`
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if verbose_first and args.command is not None:
        args.verbose = True
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    args.overrides_as_written = extra  # forwarded verbatim when `--num-processes` relaunches the command
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
