"""Evaluation by generation: axolotl's prediction table (`eval_table_size`) and causal-LM metrics
(`do_causal_lm_eval` with `eval_causal_lm_metrics`).

Each evaluation row is split back into its conversations (position ids restart at 0 for each, so packed
rows work too), and each trained turn of a conversation becomes one prompt/reference pair: the prompt is
the conversation up to the turn's first trained token (exactly what the model saw when it was trained to
answer), the reference is the turn's trained tokens. axolotl instead joins all untrained tokens of a
conversation into one prompt and all trained ones into one reference, which for a multi-turn conversation
puts later user turns into the prompt; for single-turn rows both readings agree. Generation is greedy from
the prompt's token ids (axolotl decodes the prompt to text and encodes it again, which drops the chat
template's special tokens).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dolphin_train.config.schema import Config
from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.errors import EnvironmentProblem

log = logging.getLogger(__name__)

SACREBLEU_METRICS = ("sacrebleu", "chrf", "ter")
TABLE_DIR = "eval_predictions"


@dataclass(frozen=True)
class EvalTurn:
    """One trained turn: the tokens before it (the prompt) and its own trained tokens (the reference)."""

    prompt_ids: list[int]
    reference_ids: list[int]


def conversation_spans(position_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each conversation in a row: a new one begins wherever the position id is 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    return list(zip(starts, [*starts[1:], len(position_ids)], strict=True))


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive trained labels: one per trained turn."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def turns_of_row(row: dict[str, Any]) -> Iterator[EvalTurn]:
    """The trained turns of one evaluation row (packed or not), in order. A run that starts a conversation
    has no prompt to generate from and is skipped."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    for start, end in conversation_spans(list(row["position_ids"])):
        for a, b in trained_runs(labels[start:end]):
            if a > 0:
                yield EvalTurn(ids[start : start + a], ids[start + a : start + b])


def evaluation_turns(rows: Iterable[dict[str, Any]], limit: int | None = None) -> list[EvalTurn]:
    """The trained turns of the evaluation rows, the first `limit` of them when given."""
    turns: list[EvalTurn] = []
    for row in rows:
        for turn in turns_of_row(row):
            if limit is not None and len(turns) >= limit:
                return turns
            turns.append(turn)
    return turns


def greedy_completions(
    model: Any, prompts: list[list[int]], pad_id: int, eos_id: int | None, max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """Greedy continuation of each prompt (batched, padded on the left), cut after the end-of-sequence token."""
    from transformers import GenerationConfig

    # A config of our own, not the model's: its sampling settings (temperature, repetition penalty...)
    # would make the predictions something other than the greedy answer.
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                pad_token_id=pad_id, eos_token_id=eos_id)  # fmt: skip
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=settings)
        completions += [_until_end(seq[width:].tolist(), eos_id) for seq in out]
    return completions


def _until_end(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id is not None and eos_id in tokens else tokens


def reference_nll(model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference texts under the model, and the number of predicted
    tokens: each text encoded on its own, as axolotl's perplexity metric does (without its prompt)."""
    encoded = [tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]
    encoded = [e for e in encoded if len(e) > 1]  # a single token predicts nothing
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i : i + batch_size]
        width = max(len(e) for e in batch)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([e + [pad] * (width - len(e)) for e in batch], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in batch], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))  # fmt: skip
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


def corpus_scores(names: Iterable[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu's corpus BLEU, chrF and TER of the predictions against the references (one each)."""
    import sacrebleu

    score = {"sacrebleu": sacrebleu.corpus_bleu, "chrf": sacrebleu.corpus_chrf, "ter": sacrebleu.corpus_ter}
    return {name: float(score[name](predictions, [references]).score) for name in names}


def require_metric_packages(cfg: Config) -> None:
    """Before the model loads: the sacrebleu metrics need the `sacrebleu` package."""
    import importlib.util

    wanted = [m for m in cfg.causal_lm_metrics if m in SACREBLEU_METRICS]
    if wanted and importlib.util.find_spec("sacrebleu") is None:
        raise EnvironmentProblem(f"eval_causal_lm_metrics: {', '.join(wanted)} need the sacrebleu package: "
                                 "pip install sacrebleu (or dolphin-train[eval])")  # fmt: skip


class GenerationEval:
    """What an evaluation adds when the config asks for generation: the table file (and wandb Table) and
    the `eval_<metric>` values returned for the evaluation's log line."""

    def __init__(self, cfg: Config, tokenizer: Any) -> None:
        self.table_size = cfg.eval_table_size or 0
        self.metrics = cfg.causal_lm_metrics
        self.max_new_tokens = cfg.eval_new_tokens
        self.max_len = cfg.sequence_len
        self.batch_size = cfg.micro_batch_size_for_eval
        self.output_dir = Path(cfg.output_dir)
        self.to_wandb = cfg.uses_wandb
        self.tokenizer = tokenizer

    def evaluate(self, trainer: Any, prefix: str = "eval") -> dict[str, float]:
        model, accelerator = trainer.model, trainer.accelerator
        was_training = model.training
        model.eval()
        try:
            with trainer.autocast_smart_context_manager():
                if self.table_size and accelerator.is_main_process:
                    self._write_table(model, trainer.eval_dataset, trainer.state.global_step)
                scores = self._metrics(model, trainer.eval_dataset, accelerator) if self.metrics else {}
        finally:
            model.train(was_training)
        return {f"{prefix}_{name}": value for name, value in scores.items()}

    def _complete(self, model: Any, turns: list[EvalTurn]) -> list[str]:
        tok = self.tokenizer
        completions = greedy_completions(model, [t.prompt_ids for t in turns], tok.pad_token_id, tok.eos_token_id,
                                         self.max_new_tokens, self.batch_size)  # fmt: skip
        return tok.batch_decode(completions, skip_special_tokens=True)

    def table(self, model: Any, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The first `eval_table_size` turns: prompt, greedy prediction and reference."""
        turns = evaluation_turns(rows, self.table_size)
        predictions = self._complete(model, turns)
        decode = self.tokenizer.decode
        return [{"id": i, "prompt": decode(t.prompt_ids), "prediction": p,
                 "reference": decode(t.reference_ids, skip_special_tokens=True)}
                for i, (t, p) in enumerate(zip(turns, predictions, strict=True))]  # fmt: skip

    def _write_table(self, model: Any, rows: Iterable[dict[str, Any]], step: int) -> None:
        entries = self.table(model, rows)
        path = self.output_dir / TABLE_DIR / f"step-{step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
        log.info("Evaluation predictions (%d) written to %s", len(entries), path)
        if self.to_wandb:
            _log_wandb_table(entries, step)

    def _metrics(self, model: Any, rows: Any, accelerator: Any) -> dict[str, float]:
        """Every process generates for its share of the turns; the texts are gathered for the corpus scores
        and the perplexity sums reduced, so each process returns the same values."""
        from accelerate.utils import gather_object

        turns = evaluation_turns(rows)[accelerator.process_index :: accelerator.num_processes]
        references = self.tokenizer.batch_decode([t.reference_ids for t in turns], skip_special_tokens=True)
        scores: dict[str, float] = {}
        if "perplexity" in self.metrics:
            nll, count = reference_nll(model, self.tokenizer, references, self.max_len, self.batch_size)
            sums = torch.tensor([nll, float(count)], dtype=torch.float64, device=accelerator.device)
            nll, count = accelerator.reduce(sums, reduction="sum").tolist()
            scores["perplexity"] = float(torch.exp(torch.tensor(nll / count))) if count else float("nan")
        corpus = [m for m in self.metrics if m in SACREBLEU_METRICS]
        if corpus:
            pairs = list(zip(self._complete(model, turns), references, strict=True))
            pairs = gather_object(pairs) if accelerator.num_processes > 1 else pairs
            scores |= corpus_scores(corpus, [p for p, _ in pairs], [r for _, r in pairs])
        return {name: scores[name] for name in self.metrics if name in scores}


def _log_wandb_table(entries: list[dict[str, Any]], step: int) -> None:
    """The table as a wandb Table, as axolotl logs it (when the run reports to wandb)."""
    import wandb

    if wandb.run is None:
        return
    columns = ["id", "prompt", "prediction", "reference"]
    table = wandb.Table(columns=columns, data=[[e[c] for c in columns] for e in entries])
    wandb.run.log({"eval/predictions": table, "train/global_step": step})
