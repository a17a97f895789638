"""Every fault a named error: one table of bad configs, data files, caches and command lines.

Each case writes its files under a fresh directory, runs the CLI's `main()` in this process (a few run the real
command in a subprocess), and checks: the exit code (2: config and command-line errors; 1: data and environment
errors; 0: handled, with a warning or a count), no traceback, never the generic catch-all
(`error: XxxError: ...`), and the words that name the key, the file (and line, for a row) or the path. For data
cases that succeed, the preparation report must account for every line of every file: nothing dropped uncounted.

Placeholders in a case's argv and words: {cfg} the config file, {data} the dataset directory, {tmp} the case's
directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, tiny_config

ROW = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]}
LINE = json.dumps(ROW)
GOOD = f"{LINE}\n{LINE}\n{LINE}\n"
BAD_UTF8 = LINE.encode().replace(b"hello", b"hel\xe9lo")
CATCH_ALL = re.compile(r"error: [A-Z]\w*(Error|Exception|Warning)\b|run again with -v for the full traceback")

# A "billion laughs": nine levels of nine aliases, 9**9 strings once expanded.
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{x}: &{x} [{','.join(['*' + y] * 9)}]\n" for x, y in zip("bcdefghi", "abcdefgh", strict=True)
)


@dataclass(frozen=True)
class Case:
    name: str
    code: int  # expected exit status
    words: tuple[str, ...]  # each must appear in stdout + stderr (placeholders filled in)
    argv: tuple[str, ...] = ("validate", "{cfg}")
    config: dict[str, Any] = field(default_factory=dict)  # keys over the tiny config
    raw_config: bytes | None = None  # written as the config file instead
    files: dict[str, str | bytes] = field(default_factory=dict)  # data files, under {data}
    setup: Callable[[Path], None] | None = None  # more to do before the command (damage a cache...)
    subprocess: bool = False  # run `python -m dolphin_train` instead of main()


def _cfg(name: str, code: int, words: tuple[str, ...], argv: tuple[str, ...] = ("validate", "{cfg}"), **keys: Any):
    """A config case: the tiny config with `keys` replaced."""
    return Case(name, code, words, argv, config=keys)


def _data(name: str, code: int, words: tuple[str, ...], files: dict[str, str | bytes], **keys: Any) -> Case:
    """A data case: `preprocess` on a dataset directory holding `files`."""
    return Case(name, code, words, ("preprocess", "{cfg}"), config=keys, files=files)


def _raw(name: str, code: int, words: tuple[str, ...], text: str | bytes) -> Case:
    return Case(name, code, words, raw_config=text.encode() if isinstance(text, str) else text)


def _good_yaml() -> str:
    return yaml.safe_dump(tiny_config(Path("/nonexistent")), sort_keys=False)


def _prepare_then(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Prepare the data once (in this process), then damage the cache entry before the case's own run."""

    def setup(tmp: Path) -> None:
        from dolphin_train.cli import main

        assert main(["preprocess", str(tmp / "config.yml")]) == 0
        [entry] = [p for p in (tmp / "prepared").iterdir() if not p.name.startswith(".")]
        damage(entry)

    return setup


def _truncate_arrow(entry: Path) -> None:
    arrow = sorted((entry / "train").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])


def _abandoned_work_dir(tmp: Path) -> None:
    import socket

    (tmp / "prepared" / f".0123456789abcdef-{socket.gethostname()}-999999999-x" / "out").mkdir(parents=True)


def _file(tmp: Path, name: str, text: str = "x") -> None:
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(text)


# fmt: off
CASES: list[Case] = [
    # ---- the config file itself (exit 2, naming the file) ---------------------------------------------
    _raw("alias-bomb", 2, ("{cfg}", "alias"), BOMB),
    _raw("alias-contains-itself", 2, ("{cfg}", "line 1", "&x", "line 2", "*x", "contain itself"),
         "model_config: &x\n  self: *x\n" + _good_yaml()),
    _raw("alias-contains-itself-deeper", 2, ("{cfg}", "&a", "*a", "contain itself"), "a: &a [1, &b [2, *a]]\n"),
    _raw("nested-too-deeply", 2, ("{cfg}", "nested too deeply"), "a: " + "[" * 3000 + "]" * 3000 + "\n"),
    _raw("utf16-config", 2, ("{cfg}", "UTF-16", "UTF-8"), _good_yaml().encode("utf-16")),
    _raw("utf32-config", 2, ("{cfg}", "UTF-32"), _good_yaml().encode("utf-32")),
    _raw("latin1-byte-in-config", 2, ("{cfg}", "line 3", "0xe9"), "base_model: m\n# ok\n# caf\xe9\n".encode("latin-1")),
    _raw("list-as-key", 2, ("{cfg}", "line 2", "key is a list"), "base_model: m\n? [a, b]\n: 1\n"),
    _raw("mapping-as-key", 2, ("{cfg}", "key is a list or a mapping"), "base_model: m\n? {a: 1}\n: 1\n"),
    _raw("not-yaml", 2, ("{cfg}", "not valid YAML", "line 3"), "base_model: m\ndatasets: [\n"),
    _raw("top-level-list", 2, ("{cfg}", "expected a mapping"), "- a\n- b\n"),
    _raw("top-level-scalar", 2, ("{cfg}", "expected a mapping"), "just text\n"),
    _raw("duplicate-key", 2, ("{cfg}", "learning_rate", "set twice"),
         "learning_rate: 1e-5\nlearning_rate: 2e-5\n"),
    _raw("tab-indent", 2, ("{cfg}", "not valid YAML"), "datasets:\n\t- path: a\n"),
    _raw("empty-file", 2, ("{cfg}", "base_model", "required"), ""),
    Case("config-is-a-directory", 2, ("{data}", "is a directory"), ("validate", "{data}"), files={"a.jsonl": GOOD}),
    Case("config-not-found", 2, ("{tmp}/missing.yml", "file not found"), ("validate", "{tmp}/missing.yml")),
    # ---- floats: inf and NaN refused for every float key, in the file or on the command line ------------
    *[_cfg(f"{key}-{text}", 2, ("{cfg}", key, "finite"), **{key: value})
      for key in ("learning_rate", "weight_decay", "num_epochs", "max_grad_norm", "lora_dropout", "val_set_size",
                  "warmup_ratio", "adam_epsilon", "adam_beta2", "loss_watchdog_threshold")
      for text, value in (("inf", float("inf")), ("nan", float("nan")))],
    _cfg("override-inf", 2, ("learning_rate", "finite"), ("validate", "{cfg}", "--learning_rate", ".inf")),
    _cfg("override-nan", 2, ("learning_rate", "finite"), ("validate", "{cfg}", "--learning_rate=.nan")),
    _cfg("override-minus-inf", 2, ("max_grad_norm", "finite"), ("validate", "{cfg}", "--max_grad_norm", "-.inf")),
    # ---- booleans are not numbers ------------------------------------------------------------------------
    *[_cfg(f"{key}-bool", 2, ("{cfg}", key, "not a boolean"), **{key: True})
      for key in ("micro_batch_size", "gradient_accumulation_steps", "sequence_len", "seed", "num_epochs",
                  "learning_rate", "lora_r", "max_steps", "save_total_limit", "val_set_size")],
    _cfg("override-bool", 2, ("micro_batch_size", "not a boolean"),
         ("validate", "{cfg}", "--micro_batch_size", "true")),
    _cfg("false-as-number", 2, ("warmup_steps", "not a boolean"), warmup_steps=False),
    # ---- empty paths -------------------------------------------------------------------------------------
    *[_cfg(f"empty-{key}", 2, ("{cfg}", key, "empty path"), **{key: ""})
      for key in ("base_model", "output_dir", "dataset_prepared_path", "tokenizer_config", "deepspeed")],
    _cfg("empty-dataset-path", 2, ("{cfg}", "datasets[0].path", "empty path"),
         datasets=[{"path": "", "type": "sharegpt"}]),
    _cfg("blank-dataset-path", 2, ("datasets[0].path", "empty path"), datasets=[{"path": "  "}]),
    # ---- paths that exist but are the wrong kind -----------------------------------------------------------
    Case("output-dir-is-a-file", 2, ("output_dir", "{tmp}/out", "is a file"), config={"output_dir": "{tmp}/out"},
         setup=lambda tmp: _file(tmp, "out")),
    Case("prepared-path-is-a-file", 2, ("dataset_prepared_path", "is a file"),
         config={"dataset_prepared_path": "{tmp}/prep"}, setup=lambda tmp: _file(tmp, "prep")),
    Case("deepspeed-json-syntax", 2, ("deepspeed", "{tmp}/ds.json", "line 1 column 35"),
         config={"deepspeed": "{tmp}/ds.json"},
         setup=lambda tmp: _file(tmp, "ds.json", '{"zero_optimization": {"stage": 2,}}')),
    Case("deepspeed-json-multiline", 2, ("{tmp}/ds.json", "line 4"), config={"deepspeed": "{tmp}/ds.json"},
         setup=lambda tmp: _file(tmp, "ds.json", '{\n  "a": 1,\n  "b": \n}')),
    Case("deepspeed-json-list", 2, ("{tmp}/ds.json", "not a mapping"), config={"deepspeed": "{tmp}/ds.json"},
         setup=lambda tmp: _file(tmp, "ds.json", "[1, 2]")),
    Case("deepspeed-json-not-utf8", 2, ("{tmp}/ds.json", "UTF-8"), config={"deepspeed": "{tmp}/ds.json"},
         setup=lambda tmp: (tmp / "ds.json").write_bytes(b'{"a": "\xff"}')),
    Case("plan-deepspeed-json-syntax", 2, ("{tmp}/ds.json", "not valid JSON"), ("plan", "{cfg}"),
         config={"deepspeed": "{tmp}/ds.json"}, setup=lambda tmp: _file(tmp, "ds.json", "{,}")),
    # ---- command-line overrides and flags ---------------------------------------------------------------
    _cfg("override-malformed-list", 2, ("--datasets", "not valid YAML"),
         ("validate", "{cfg}", "--datasets", "[{path: ")),
    _cfg("override-malformed-mapping", 2, ("--special_tokens", "not valid YAML"),
         ("validate", "{cfg}", "--special_tokens", "{eos_token: ")),
    _cfg("override-unknown-key", 2, ("--learnin_rate", "did you mean `learning_rate`"),
         ("validate", "{cfg}", "--learnin_rate", "1e-5")),
    _cfg("override-without-value", 2, ("--learning_rate", "needs a value"), ("validate", "{cfg}", "--learning_rate")),
    _cfg("stray-argument", 2, ("'stray'", "unexpected argument"), ("validate", "{cfg}", "stray")),
    _cfg("override-bad-value", 2, ("micro_batch_size", "0"), ("validate", "{cfg}", "--micro_batch_size", "0")),
    _cfg("plan-zero-gpus", 2, ("--gpus 0", "at least 1"), ("plan", "{cfg}", "--gpus", "0")),
    _cfg("plan-negative-gpus", 2, ("--gpus -2", "at least 1"), ("plan", "{cfg}", "--gpus", "-2")),
    Case("merge-lora-nothing-to-merge", 2, ("--base", "--adapter"), ("merge-lora",)),
    _cfg("verbose-before-command", 0, ("valid",), ("-v", "validate", "{cfg}")),
    _cfg("verbose-before-config", 0, ("valid",), ("--verbose", "validate", "{cfg}")),
    # ---- values the schema refuses, each naming its key ---------------------------------------------------
    _cfg("unknown-key", 2, ("{cfg}", "learning_rat", "did you mean `learning_rate`"), learning_rat=1e-5),
    _cfg("micro-batch-zero", 2, ("{cfg}", "micro_batch_size"), micro_batch_size=0),
    _cfg("micro-batch-negative", 2, ("micro_batch_size", "-1"), micro_batch_size=-1),
    _cfg("micro-batch-float", 2, ("micro_batch_size",), micro_batch_size=2.5),
    _cfg("sequence-len-tiny", 2, ("sequence_len", "16"), sequence_len=8),
    _cfg("learning-rate-text", 2, ("learning_rate", "'fast'"), learning_rate="fast"),
    _cfg("learning-rate-zero", 2, ("learning_rate",), learning_rate=0),
    _cfg("unknown-optimizer", 2, ("optimizer", "unknown optimizer"), optimizer="adamw_tourch"),
    _cfg("unknown-scheduler", 2, ("lr_scheduler", "unknown scheduler"), lr_scheduler="cosin"),
    _cfg("unknown-template", 2, ("chat_template", "did you mean `chatml`"), chat_template="chatm"),
    _cfg("unknown-dataset-type", 2, ("datasets[0].type",), datasets=[{"path": "x.jsonl", "type": "sharegtp"}]),
    _cfg("unknown-dataset-key", 2, ("datasets[0].pth", "did you mean `path`"), datasets=[{"pth": "x.jsonl"}]),
    _cfg("datasets-not-a-list", 2, ("datasets",), datasets="x.jsonl"),
    _cfg("datasets-missing", 2, ("datasets", "required"), datasets=None),
    _cfg("unknown-special-token", 2, ("special_tokens.eos_tokn", "did you mean `eos_token`"),
         special_tokens={"eos_tokn": "x"}),
    _cfg("val-set-fraction-above-one", 2, ("val_set_size", "whole number"), val_set_size=1.5),
    _cfg("warmup-both", 2, ("warmup_steps and warmup_ratio",), warmup_steps=10, warmup_ratio=0.1),
    _cfg("evals-and-eval-steps", 2, ("evals_per_epoch and eval_steps",), evals_per_epoch=2, eval_steps=5),
    _cfg("qlora-without-4bit", 2, ("qlora", "load_in_4bit"), adapter="qlora"),
    _cfg("unsupported-key", 2, ("group_by_length", "not supported"), group_by_length=True),
    _cfg("resume-missing-dir", 1, ("resume_from_checkpoint", "{tmp}/nowhere", "not a directory"),
         ("train", "{cfg}"), resume_from_checkpoint="{tmp}/nowhere"),
    # ---- valid, but said: warnings (exit 0) ---------------------------------------------------------------
    _cfg("evals-without-eval-set", 0, ("evals_per_epoch", "no evaluation set"), evals_per_epoch=2),
    _cfg("eval-steps-without-eval-set", 0, ("eval_steps", "no evaluation set"), eval_steps=5),
    _cfg("missing-local-base-model-validate", 0, ("warning", "base_model", "{tmp}/no-model", "does not exist"),
         base_model="{tmp}/no-model"),
    _cfg("missing-dataset-validate", 0, ("warning", "{tmp}/none.jsonl"), datasets=[{"path": "{tmp}/none.jsonl"}]),
    # ---- environment: models (exit 1, naming the path) --------------------------------------------------
    _cfg("missing-local-base-model", 1, ("base_model", "{tmp}/no-model", "does not exist"), ("preprocess", "{cfg}"),
         base_model="{tmp}/no-model", tokenizer_config=None),
    _cfg("missing-local-tokenizer", 1, ("tokenizer_config", "{tmp}/no-tok", "does not exist"), ("preprocess", "{cfg}"),
         tokenizer_config="{tmp}/no-tok"),
    Case("chat-on-a-dir-without-model", 1, ("{data}", "no saved model"), ("chat", "{data}", "--prompt", "hi"),
         files={"a.jsonl": GOOD}),
    Case("chat-on-a-missing-dir", 1, ("{tmp}/nothing", "not a model directory"), ("chat", "{tmp}/nothing")),
    Case("chat-model-without-tokenizer", 1, ("{tmp}/m", "no tokenizer"), ("chat", "{tmp}/m", "--prompt", "hi"),
         setup=lambda tmp: (tmp / "m").mkdir() or _file(tmp, "m/config.json", "{}")),
    # ---- data files (exit 1 naming file and line; with skip_invalid_rows, skipped and counted) ------------
    _data("non-utf8-line", 1, ("{data}/a.jsonl:2", "0xe9", "UTF-8"),
          {"a.jsonl": LINE.encode() + b"\n" + BAD_UTF8 + b"\n"}),
    _data("non-utf8-line-skipped", 0, ("not UTF-8 text",), {"a.jsonl": LINE.encode() + b"\n" + BAD_UTF8 + b"\n"},
          skip_invalid_rows=True),
    _data("non-utf8-in-json-lines-named-json", 1, ("{data}/a.json:1",), {"a.json": BAD_UTF8 + b"\n" + LINE.encode()}),
    _data("non-utf8-in-json-array", 1, ("{data}/a.json:2", "UTF-8"), {"a.json": b"[\n" + BAD_UTF8 + b"\n]"}),
    _data("non-utf8-in-csv", 1, ("{data}/a.csv:3", "UTF-8"),
          {"a.csv": b"instruction,output\nhi,there\nx,caf\xe9\n"}, datasets=[{"path": "{data}", "type": "alpaca"}]),
    _data("empty-file-next-to-good", 0, ("empty file", "{data}/b.jsonl"), {"a.jsonl": GOOD, "b.jsonl": ""}),
    _data("whitespace-only-file", 0, ("empty file", "{data}/b.jsonl"), {"a.jsonl": GOOD, "b.jsonl": "\n \n"}),
    _data("only-empty-files", 1, ("no usable rows", "{data}/a.jsonl"), {"a.jsonl": ""}),
    _data("blank-lines-counted", 0, ("blank lines", "{data}/a.jsonl"), {"a.jsonl": f"{LINE}\n\n{LINE}\n   \n{LINE}\n"}),
    _data("blank-lines-in-json-named-file", 0, ("blank lines", "{data}/a.json"), {"a.json": f"{LINE}\n\n{LINE}\n"}),
    _data("text-file-in-dataset-dir", 0, ("not a data file", "{data}/notes.txt"), {"a.jsonl": GOOD, "notes.txt": "hi"}),
    _data("readme-in-dataset-dir", 0, ("{data}/README.md",), {"a.jsonl": GOOD, "README.md": "# data"}),
    _data("hidden-files-in-dataset-dir", 0, ("Prepared data",), {"a.jsonl": GOOD, ".gitattributes": "*.jsonl lfs",
          ".cache/huggingface/a.lock": ""}),
    _data("invalid-json-line", 1, ("{data}/a.jsonl:2", "invalid JSON"), {"a.jsonl": f"{LINE}\n{{oops\n{LINE}\n"}),
    _data("invalid-json-skipped", 0, ("invalid JSON",), {"a.jsonl": f"{LINE}\n{{oops\n{LINE}\n"},
          skip_invalid_rows=True),
    _data("truncated-last-line", 1, ("{data}/a.jsonl:2",), {"a.jsonl": f"{LINE}\n{LINE[:20]}"}),
    _data("row-without-conversations", 1, ("{data}/a.jsonl:1",), {"a.jsonl": '{"text": "x"}\n' + GOOD}),
    _data("row-not-an-object", 1, ("{data}/a.jsonl:2",), {"a.jsonl": f"{LINE}\n[1, 2]\n"}),
    _data("row-unknown-role", 1, ("{data}/a.jsonl:1", "robot"),
          {"a.jsonl": json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n" + GOOD}),
    _data("row-value-not-text", 1, ("{data}/a.jsonl:1",),
          {"a.jsonl": json.dumps({"conversations": [{"from": "human", "value": 3}]}) + "\n"}),
    _data("json-scalar-file", 1, ("{data}/a.json", "expected a JSON array"), {"a.json": "42"}),
    _data("alpaca-missing-output", 1, ("{data}/a.jsonl:1",), {"a.jsonl": '{"instruction": "hi"}\n'},
          datasets=[{"path": "{data}", "type": "alpaca"}]),
    _data("val-set-too-large-fraction", 1, ("val_set_size", "0.999", "3 rows"), {"a.jsonl": GOOD}, val_set_size=0.999),
    _data("val-set-too-large-count", 1, ("val_set_size", "3 rows"), {"a.jsonl": GOOD}, val_set_size=5),
    _data("val-set-too-small-fraction", 1, ("val_set_size", "0.01"), {"a.jsonl": GOOD}, val_set_size=0.01),
    _data("dataset-file-missing", 1, ("{data}/missing.jsonl", "not found"), {"a.jsonl": GOOD},
          datasets=[{"path": "{data}/missing.jsonl"}]),
    _data("dataset-dir-without-data", 1, ("{data}", "holds no"), {"notes.txt": "x"}),
    _data("dataset-glob-matches-nothing", 1, ("{data}/*.parquet", "matches no file"), {"a.jsonl": GOOD},
          datasets=[{"path": "{data}/*.parquet"}]),
    _data("dataset-unsupported-type", 1, ("{data}/a.txt", "unsupported file type"), {"a.txt": "x"},
          datasets=[{"path": "{data}/a.txt"}]),
    _data("data-files-missing", 1, ("data_files not found", "{data}/b.jsonl"), {"a.jsonl": GOOD},
          datasets=[{"path": "{data}", "data_files": ["b.jsonl"]}]),
    _data("broken-parquet", 1, ("{data}/a.parquet", "cannot read"), {"a.parquet": b"PAR1 not really"}),
    _data("broken-arrow", 1, ("{data}/a.arrow", "cannot read"), {"a.arrow": b"nope"}),
    # ---- the prepared-data cache -------------------------------------------------------------------------
    Case("prepared-path-inside-dataset-dir", 0, ("reused from cache",), ("preprocess", "{cfg}"),
         files={"a.jsonl": GOOD},
         config={"dataset_prepared_path": "{data}/prepared", "output_dir": "{data}/out"},
         setup=lambda tmp: _file(tmp, "data/out/trainer_state.json", "{}") or _prepare_in(tmp)),
    Case("cache-without-report", 0, ("Prepared data",), ("preprocess", "{cfg}"), files={"a.jsonl": GOOD},
         setup=_prepare_then(lambda entry: (entry / "report.json").unlink())),
    Case("cache-without-train", 0, ("Prepared data",), ("preprocess", "{cfg}"), files={"a.jsonl": GOOD},
         setup=_prepare_then(lambda entry: __import__("shutil").rmtree(entry / "train"))),
    Case("cache-report-garbled", 0, ("Prepared data",), ("preprocess", "{cfg}"), files={"a.jsonl": GOOD},
         setup=_prepare_then(lambda entry: (entry / "report.json").write_text("{"))),
    Case("cache-arrow-truncated", 0, ("Prepared data",), ("preprocess", "{cfg}"), files={"a.jsonl": GOOD},
         setup=_prepare_then(_truncate_arrow)),
    Case("abandoned-preparation-removed", 0, ("Prepared data",), ("preprocess", "{cfg}"), files={"a.jsonl": GOOD},
         setup=_abandoned_work_dir),
    # ---- the real command, in a subprocess ----------------------------------------------------------------
    Case("subprocess-inf", 2, ("{cfg}", "learning_rate", "finite"), config={"learning_rate": float("inf")},
         subprocess=True),
    Case("subprocess-verbose-first", 2, ("{cfg}", "micro_batch_size"), ("-v", "validate", "{cfg}"),
         config={"micro_batch_size": True}, subprocess=True),
]
# fmt: on


def _prepare_in(tmp: Path) -> None:
    from dolphin_train.cli import main

    assert main(["preprocess", str(tmp / "config.yml")]) == 0


def _filled(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        for name, path in (("{cfg}", tmp / "config.yml"), ("{data}", tmp / "data"), ("{tmp}", tmp)):
            value = value.replace(name, str(path))
        return value
    if isinstance(value, list):
        return [_filled(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v, tmp) for k, v in value.items()}
    return value


def _write_case(case: Case, tmp: Path) -> None:
    for name, content in case.files.items():
        path = tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    config = tmp / "config.yml"
    if case.raw_config is not None:
        config.write_bytes(case.raw_config)
        return
    keys = tiny_config(tmp, **({"datasets": [{"path": str(tmp / "data"), "type": "sharegpt"}]} if case.files else {}))
    for key, value in _filled(case.config, tmp).items():
        if value is None:
            keys.pop(key, None)
        else:
            keys[key] = value
    config.write_text(yaml.safe_dump(keys, sort_keys=False))


def _run(case: Case, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "dolphin_train", *argv], capture_output=True, text=True,
                              timeout=120, cwd=REPO, check=False)  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr
    from dolphin_train.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def _jsonl_lines(path: Path) -> int:
    data = path.read_bytes()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _check_every_row_counted(case: Case, tmp: Path) -> None:
    """The report accounts for every line of every data file: rows read (kept, skipped as invalid, dropped
    for length or no trainable token), blank lines, empty files; files that are not data are listed."""
    reports = sorted(tmp.rglob("report.json"))
    assert reports, "no preparation report was written"
    report = json.loads(reports[-1].read_text())
    data = tmp / "data"
    jsonl = [p for p in data.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json")
             and "prepared" not in p.parts and "out" not in p.parts]  # fmt: skip
    read = sum(report["rows_read"].values())
    assert (
        read
        == report["kept"]
        + sum(report["skipped_invalid"].values())
        + report["dropped_too_long"]
        + (report["dropped_no_trainable"])
    )
    blank = sum(report["blank_lines"].values())
    nonblank_files = [p for p in jsonl if p.read_bytes().strip()]
    assert read + blank == sum(_jsonl_lines(p) for p in nonblank_files)
    assert sorted(report["empty_files"]) == sorted(str(p) for p in jsonl if not p.read_bytes().strip())

    def listed(p: Path) -> bool:  # not data, not hidden, not the cache or the output directory
        parts = p.relative_to(data).parts
        return p.suffix not in (".jsonl", ".json", ".csv") and not any(
            part.startswith(".") or part in ("prepared", "out") for part in parts
        )

    others = [str(p) for p in data.rglob("*") if p.is_file() and listed(p)]
    assert sorted(report["skipped_files"]) == sorted(others)


@pytest.fixture(autouse=True, scope="module")
def _library_messages_through_our_handler() -> Iterator[None]:
    """`datasets` gives its logger a handler on the stderr of the moment it is imported: under pytest, a stream
    closed after that test. Its messages reach the CLI's handler anyway (they propagate to the root logger)."""
    import logging

    import datasets  # noqa: F401  (imported now, so that its handler exists to be removed)

    library = logging.getLogger("datasets")
    handlers = list(library.handlers)
    library.handlers.clear()
    yield
    library.handlers[:] = handlers


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_is_a_named_error(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_case(case, tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    code, output = _run(case, [_filled(a, tmp_path) for a in case.argv], capsys)
    assert "Traceback" not in output, output
    assert not CATCH_ALL.search(output), output
    assert code == case.code, output
    for word in _filled(list(case.words), tmp_path):
        assert word in output, f"{word!r} not in:\n{output}"
    if case.files and code == 0 and case.argv[0] == "preprocess":
        _check_every_row_counted(case, tmp_path)


def test_table_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)


def test_abandoned_work_dir_is_removed_and_cache_entry_rebuilt(tmp_path: Path, capsys) -> None:
    """The cache's own temporary directories: one left by a killed preparation goes on the next run."""
    case = next(c for c in CASES if c.name == "abandoned-preparation-removed")
    _write_case(case, tmp_path)
    _abandoned_work_dir(tmp_path)
    code, output = _run(case, [_filled(a, tmp_path) for a in case.argv], capsys)
    assert code == 0, output
    assert [p.name for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".")] == []


def test_prepared_path_inside_dataset_dir_reads_the_same_rows_twice(tmp_path: Path, capsys) -> None:
    case = next(c for c in CASES if c.name == "prepared-path-inside-dataset-dir")
    _write_case(case, tmp_path)
    _prepare_in(tmp_path)
    first = json.loads(next((tmp_path / "data/prepared").glob("*/report.json")).read_text())
    (tmp_path / "data/prepared/other-leftover").mkdir()  # still never data
    _file(tmp_path, "data/prepared/other-leftover/rows.jsonl", "not json\n")
    code, output = _run(case, [_filled(a, tmp_path) for a in case.argv], capsys)
    assert code == 0, output
    assert first["rows_read"] == {str(tmp_path / "data"): 3} and first["skipped_files"] == []
