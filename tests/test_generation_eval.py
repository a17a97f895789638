"""Evaluation by generation (`eval_table_size`, `do_causal_lm_eval`): the table's prompts end where the
labels start, its predictions are the model's greedy answer, and the metrics match a hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, tiny_config, write_config, write_jsonl
from dolphin_train.cli import main
from dolphin_train.config.load import validate_mapping
from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.recipe import set_up_run
from dolphin_train.train.generation_eval import EvalTurn, turns_of_row

NEW_TOKENS = 6


def test_a_packed_row_splits_into_each_conversations_trained_turns() -> None:
    """Two conversations packed in one row (positions restart at 0): one turn each for the first's two
    answers, and the second's answer prompted by the second conversation alone."""
    x = IGNORE_INDEX
    row = {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
           "labels": [x, x, 3, 4, x, 6, x, x, 9, 10],
           "position_ids": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]}  # fmt: skip
    assert list(turns_of_row(row)) == [EvalTurn([1, 2], [3, 4]), EvalTurn([1, 2, 3, 4, 5], [6]),
                                       EvalTurn([7, 8], [9, 10])]  # fmt: skip


def _run(tmp_path: Path, **overrides: Any) -> Any:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:12]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    raw = tiny_config(tmp_path, data, val_set_size=0.5, sequence_len=1024, sample_packing=True, micro_batch_size=2,
                      eval_max_new_tokens=NEW_TOKENS, **overrides)  # fmt: skip
    return set_up_run(validate_mapping(raw))


def _turns_by_hand(run: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of every trained turn of the (unpacked) evaluation conversations."""
    turns = []
    for row in run.prepared.eval:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        for k in range(1, len(ids)):
            if labels[k] != IGNORE_INDEX and labels[k - 1] == IGNORE_INDEX:
                end = next((j for j in range(k, len(ids)) if labels[j] == IGNORE_INDEX), len(ids))
                turns.append((ids[:k], ids[k:end]))
    return turns


def _greedy(model: Any, tokenizer: Any, prompt: list[int]) -> str:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def test_table_rows_are_prompts_up_to_the_labels_with_the_greedy_prediction(tmp_path: Path) -> None:
    run = _run(tmp_path, eval_table_size=3)
    metrics = run.trainer.evaluate()
    assert not any(k in metrics for k in ("eval_perplexity", "eval_sacrebleu"))  # a table only
    table = [json.loads(line) for line in (tmp_path / "out/eval_predictions/step-0.jsonl").read_text().splitlines()]
    assert len(table) == 3
    tok, model = run.tok.tokenizer, run.trainer.model.eval()
    by_prompt = {tok.decode(prompt): (prompt, reference) for prompt, reference in _turns_by_hand(run)}
    for entry in table:
        prompt, reference = by_prompt[entry["prompt"]]  # the prompt ends exactly where a turn's labels start
        assert entry["reference"] == tok.decode(reference, skip_special_tokens=True)
        assert entry["prediction"] == _greedy(model, tok, prompt)


def test_perplexity_and_sacrebleu_scores_match_a_hand_computation(tmp_path: Path) -> None:
    import sacrebleu

    run = _run(tmp_path, do_causal_lm_eval=True, eval_causal_lm_metrics=["perplexity", "sacrebleu", "chrf", "ter"])
    metrics = run.trainer.evaluate()
    tok, model = run.tok.tokenizer, run.trainer.model.eval()
    turns = _turns_by_hand(run)
    references = [tok.decode(reference, skip_special_tokens=True) for _, reference in turns]
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in references:
            ids = tok(text)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            nll -= sum(float(torch.log_softmax(logits[i], -1)[ids[i + 1]]) for i in range(len(ids) - 1))
            count += len(ids) - 1
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    predictions = [_greedy(model, tok, prompt) for prompt, _ in turns]
    assert metrics["eval_sacrebleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert metrics["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert metrics["eval_ter"] == pytest.approx(sacrebleu.corpus_ter(predictions, [references]).score)


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"eval_table_size": -1}, "eval_table_size"),
        ({"do_causal_lm_eval": True, "eval_causal_lm_metrics": ["bleu"]}, "eval_causal_lm_metrics"),
        ({"do_causal_lm_eval": True, "eval_causal_lm_metrics": ["comet"]}, "comet scores with a neural model"),
        ({"eval_causal_lm_metrics": ["perplexity"]}, "no effect without do_causal_lm_eval"),
        ({"do_causal_lm_eval": True, "val_set_size": 0}, "do_causal_lm_eval generates from the evaluation set"),
        ({"eval_table_size": 2, "fsdp": ["full_shard", "auto_wrap"]}, "eval_table_size with fsdp"),
        ({"eval_table_size": 2, "train_on_inputs": True}, "no turn has a prompt"),
    ],
)
def test_bad_generation_settings_exit_2_naming_the_key(tmp_path: Path, capsys: Any, keys: dict, says: str) -> None:
    path = write_config(tmp_path / "c.yml", tiny_config(tmp_path, **{"val_set_size": 0.1, **keys}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_console_shows_the_metrics_on_the_evaluation_line() -> None:
    from dolphin_train.train.console import evaluation_line

    line = evaluation_line(4, 10, {"eval_loss": 1.5, "eval_perplexity": 12.3456, "eval_sacrebleu": 7.0})
    assert line == "step  4/10  eval loss 1.5000  perplexity 12.35  BLEU 7.00"


def test_a_run_writes_one_table_per_evaluation_and_logs_the_metrics_on_its_lines(tmp_path: Path, capsys: Any) -> None:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:12]]
    raw = tiny_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_steps=2, eval_steps=1, val_set_size=4,
                      eval_table_size=2, eval_max_new_tokens=4, do_causal_lm_eval=True,
                      eval_causal_lm_metrics=["perplexity"])  # fmt: skip
    assert main([str(write_config(tmp_path / "c.yml", raw))]) == 0
    tables = sorted(p.name for p in (tmp_path / "out/eval_predictions").iterdir())
    assert tables == ["step-0.jsonl", "step-1.jsonl", "step-2.jsonl"]
    lines = capsys.readouterr().out.splitlines()
    evaluations = [line for line in lines if line.startswith("step ") and "eval loss" in line]
    assert len(evaluations) == 3 and all(" perplexity " in line for line in evaluations), evaluations
