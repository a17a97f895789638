"""What the console shows: progress bars only where a terminal can redraw them, and the libraries' own bars
(`datasets`' "Generating train split" and "Saving the dataset", transformers' "Writing model shards") only
with `-v`. In a log file (a SLURM log, `| tee`), carriage-return bars would leave a line of garbage per
redraw, so nothing is drawn there and the training log lines carry the progress instead."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_verbose = False


def set_verbose(verbose: bool) -> None:
    """`-v`: library bars and chatter come back (called once by the CLI)."""
    global _verbose
    _verbose = verbose


def verbose() -> bool:
    return _verbose


def bars_wanted() -> bool:
    """Our own progress bars: on a terminal (standard error, where tqdm draws), unless TQDM_DISABLE is set."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


@contextmanager
def datasets_bars(shown: bool) -> Iterator[None]:
    """`datasets`' bars on or off for the work inside (restored after). Ours (reading, tokenizing) are shown
    on a terminal; the library's bookkeeping (generating splits, saving) only with -v."""
    import datasets

    before = datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if before else datasets.enable_progress_bars)()


def hide_transformers_bars() -> None:
    """transformers' own bars ("Writing model shards" at every checkpoint) stay hidden unless -v."""
    if _verbose:
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
