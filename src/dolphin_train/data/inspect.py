"""`dolphin-train inspect`: look at prepared rows the way the model sees them, before paying for a run."""

from __future__ import annotations

from typing import Any

import numpy as np

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.data.packing import PackingOrder, pack_conversations
from dolphin_train.data.prepare import PreparedData
from dolphin_train.terminal import bars_wanted


def highlighted_example(tokenizer: Any, input_ids: list[int], labels: list[int], show_ids: bool) -> Any:
    """Each token as text; trained tokens in bold green, the rest dim. Newlines stay visible as ↵."""
    from rich.text import Text

    text = Text()
    for token_id, label in zip(input_ids, labels, strict=True):
        piece = tokenizer.decode([token_id]).replace("\n", "↵\n")
        if show_ids:
            piece = f"{piece}({token_id})"
        text.append(piece, style="bold green" if label != IGNORE_INDEX else "dim")
    return text


def labelled_example(tokenizer: Any, row: dict[str, Any], index: int, show_ids: bool) -> Any:
    """One prepared row under a heading with its length and trained tokens (`inspect`, and `debug: true`)."""
    from rich.console import Group
    from rich.rule import Rule

    heading = Rule(f"example {index} ({row['length']} tokens, {row['trainable']} trained: bold green)")
    return Group(heading, highlighted_example(tokenizer, row["input_ids"], row["labels"], show_ids))


def statistics_table(prepared: PreparedData, sequence_len: int, seed: int, order: PackingOrder | None = None) -> Any:
    order = order or PackingOrder()
    lengths = np.asarray(prepared.train["length"], dtype=np.int64)
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    layout = pack_conversations(lengths, sequence_len, seed, bars_wanted(), order)
    table = prepared.report.table()  # the preparation report, then the shape of the training rows
    table.add_row("length p50 / p90 / p99 / max", f"{p50:,} / {p90:,} / {p99:,} / {int(lengths.max()):,}")
    table.add_row(
        f"packing at {sequence_len} tokens" + (" (next fit, in order)" if order.sequential else ""),
        f"{len(layout.bins):,} rows (lower bound {layout.lower_bound_rows:,}), {layout.efficiency:.2%} full",
    )
    return table
