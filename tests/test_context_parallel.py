"""Context parallelism (`context_parallel_size`): a packed batch spread over 2 CPU processes (gloo) gives the
loss and gradients of one process, wherever the cut falls (inside a conversation included), with fewer
key/value heads than processes too; through the whole run (plain DDP, ZeRO-3, FSDP) each step and the
evaluation loss equal one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config, write_jsonl
from dolphin_train.config.load import validate_mapping
from dolphin_train.config.machine import Machine
from dolphin_train.config.resolve import SDPA_VARLEN, VARLEN, resolve_runtime
from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.errors import ConfigError, EnvironmentProblem
from dolphin_train.model.context_parallel import ContextGroup, check_heads, split_ranks
from dolphin_train.train.collator import ChatCollator
from dolphin_train.train.context_parallel import cut_batch, shifted_labels

PROBE = str(Path(__file__).with_name("context_parallel_probe.py"))
GRAD_PROBE = str(Path(__file__).with_name("grad_probe.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
CPU = Machine(device="cpu", bf16=False, tf32=False, varlen_attention=False, flash_attn=False, liger=False)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _rows() -> list[dict[str, list[int]]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from context_parallel_probe import packed_rows

    return packed_rows()


# ---- the cut --------------------------------------------------------------------------------------------


def test_the_shares_laid_end_to_end_are_the_batch_with_each_position_s_next_token() -> None:
    """3 rows of 9 tokens = 27, padded to 28 for 2 processes: the cut at 14 falls inside a conversation, and
    the first share's last position is trained on the second share's first token."""
    batch = ChatCollator(pad_token_id=0, pad_to_multiple_of=1, boundaries=True)(_rows())
    shares = [cut_batch(batch, ContextGroup(2, rank, None), pad_token_id=0) for rank in (0, 1)]
    ids = torch.cat([s["input_ids"] for s in shares], dim=1)
    targets = torch.cat([s["shift_labels"] for s in shares], dim=1)
    assert ids.shape == (1, 28) and shares[0]["input_ids"].shape == (1, 14)
    assert torch.equal(ids[0, :27], batch["input_ids"].flatten())
    assert torch.equal(targets[0, :27], shifted_labels(batch["labels"]).flatten())
    assert targets[0, 27] == IGNORE_INDEX  # the padding trains nothing
    assert shares[0]["shift_labels"][0, -1] == batch["input_ids"][1, 5] != IGNORE_INDEX  # across the cut
    positions = torch.cat([s["position_ids"] for s in shares], dim=1)[0]
    assert positions[13:15].tolist() == [4, 5]  # the cut is inside the third row's second conversation
    assert shares[1]["cu_seq_lens_q"].tolist() == [0, 4, 9, 18, 20, 27, 28]  # the whole batch's, padding its own
    assert all(torch.equal(s["labels"], s["shift_labels"]) for s in shares)


def test_consecutive_ranks_form_the_groups() -> None:
    assert split_ranks(4, 2) == [[0, 1], [2, 3]]
    assert split_ranks(2, 2) == [[0, 1]]


def test_the_chunked_loss_takes_shifted_labels_and_a_share_without_trained_tokens() -> None:
    """A share's labels come shifted (its last position has a target); a share whose tokens are all untrained
    gives 0 and still a backward pass through the head and the hidden states (every process of the group
    must run the backward's all-to-alls)."""
    from dolphin_train.train.loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    weight = torch.randn(32, 8, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 3, 5, IGNORE_INDEX, 7, 9]])
    plain = chunked_causal_lm_loss(hidden, weight, None, labels, chunk_tokens=2)
    shifted = chunked_causal_lm_loss(hidden, weight, None, shifted_labels(labels), chunk_tokens=2, shifted=True)
    torch.testing.assert_close(shifted, plain)
    nothing = chunked_causal_lm_loss(hidden, weight, None, torch.full((1, 6), IGNORE_INDEX), shifted=True,
                                     num_items_in_batch=4)  # fmt: skip
    nothing.backward()
    assert float(nothing) == 0.0 and weight.grad is not None and hidden.grad is not None


# ---- configuration ----------------------------------------------------------------------------------------


def test_the_former_name_is_read_and_a_disagreement_refused(tmp_path: Path) -> None:
    assert validate_mapping(tiny_config(tmp_path, sequence_parallel_degree=2)).cp_size == 2
    assert validate_mapping(tiny_config(tmp_path, context_parallel_size=2)).cp_size == 2
    with pytest.raises(ConfigError, match=r"sequence_parallel_degree: 4 .* disagree"):
        validate_mapping(tiny_config(tmp_path, context_parallel_size=2, sequence_parallel_degree=4))
    with pytest.raises(ConfigError, match="context_parallel_size: 2 with lisa_n_layers"):
        validate_mapping(tiny_config(tmp_path, context_parallel_size=2, lisa_n_layers=1))


def test_the_world_size_must_be_a_multiple_of_the_group_named_with_the_numbers(tmp_path: Path) -> None:
    from dolphin_train.train.environment import set_up_process_environment

    cfg = validate_mapping(tiny_config(tmp_path, context_parallel_size=2))
    runtime = resolve_runtime(cfg, Machine(**{**CPU.__dict__, "world_size": 3}))
    with pytest.raises(EnvironmentProblem, match="context_parallel_size: 2 must divide the 3 processes"):
        set_up_process_environment(cfg, runtime)


def test_the_plan_says_a_groups_batch_and_each_gpus_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """On 4 GPUs in groups of 2, a step trains micro-batch x accumulation x 2 rows (one batch per group), and
    each GPU holds half of a row's tokens."""
    from dolphin_train.cli import main

    cfg = tiny_config(tmp_path, context_parallel_size=2, micro_batch_size=3, gradient_accumulation_steps=5,
                      sequence_len=1000)  # fmt: skip
    assert main(["plan", str(write_config(tmp_path / "c.yml", cfg)), "--gpus", "4"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "3 x 1000 tokens per context-parallel group of 2 GPUs (500 per GPU), 30 rows (30,000 tokens)" in out


def test_attention_runs_through_the_entry_point_under_context_parallelism(tmp_path: Path) -> None:
    cfg = validate_mapping(tiny_config(tmp_path, context_parallel_size=2))
    assert resolve_runtime(cfg, CPU).attn_implementation == SDPA_VARLEN  # SDPA per sequence on the CPU
    cuda = Machine(device="cuda", bf16=True, tf32=True, varlen_attention=True, flash_attn=False, liger=False)
    assert resolve_runtime(cfg, cuda).attn_implementation == VARLEN
    assert resolve_runtime(validate_mapping(tiny_config(tmp_path)), CPU).attn_implementation == "sdpa"


def test_query_heads_must_divide_by_the_group_named_with_the_numbers() -> None:
    from transformers import LlamaConfig

    assert check_heads(LlamaConfig(num_attention_heads=4, num_key_value_heads=1), 2) is None
    six_heads = LlamaConfig(hidden_size=96, num_attention_heads=6)
    assert "must divide the model's 6 attention heads" in check_heads(six_heads, 4)


# ---- two processes ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-heads-divide", "fewer-kv-heads-than-processes"])
def test_two_processes_give_the_loss_and_gradients_of_one(tmp_path: Path, kv_heads: int) -> None:
    """The tiny Llama on 3 packed rows, the cut inside a conversation; with 1 key/value head (fewer than the
    2 processes) the heads are repeated before the exchange."""
    out = tmp_path / "probe.pt"
    result = subprocess.run([*TORCHRUN, PROBE, str(kv_heads), str(out)], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = torch.load(out)
    assert (found["share_tokens"], found["batch_tokens"]) == (14, 27)
    (whole_loss, whole_grads), (loss, grads) = found["whole"], found["parallel"]
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def _probe_run(tmp_path: Path, name: str, launcher: list[str], **overrides) -> dict:
    rows = [json.loads(line) for line in (REPO / "data/tiny_chat.jsonl").read_text().splitlines()[:40]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = tiny_config(tmp_path / name, data, max_steps=1, max_grad_norm=0.0, val_set_size=8, sample_packing=True,
                      dataset_prepared_path=str(tmp_path / "prepared"), **overrides)  # fmt: skip
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / f"{name}.pt"
    result = subprocess.run([*launcher, GRAD_PROBE, str(config), str(out)], capture_output=True, text=True,
                            env=_env(), cwd=REPO, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_a_training_step_and_evaluation_with_context_parallel_2_equal_one_process(tmp_path: Path) -> None:
    """The tiny default, packed rows of several conversations, micro batch 2 per group: one process with the
    same global batch against 2 context-parallel groups of 2 on 4 processes (the groups get different rows,
    the processes of a group the same; one group alone is the 2-process runs' case below). Loss, every
    gradient and the evaluation loss agree to float32 rounding."""
    processes = 4
    groups = processes // 2
    one = _probe_run(tmp_path, "one", [sys.executable], micro_batch_size=2 * groups)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cp = _probe_run(tmp_path, "cp", launcher, micro_batch_size=2, context_parallel_size=2)
    assert (one["world_size"], cp["world_size"]) == (1, processes)
    assert cp["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert cp["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
    assert one["grads"].keys() == cp["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(cp["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


SGD_STEPS = {"max_steps": 2, "save_steps": 2, "optimizer": "sgd", "learning_rate": 100.0, "max_grad_norm": 0.0,
             "weight_decay": 0.0, "sample_packing": True, "micro_batch_size": 2, "chunked_cross_entropy": True,
             "val_set_size": 8, "eval_steps": 1}  # fmt: skip


def _train(config: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, "-m", "dolphin_train", str(config)], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _history(out: Path) -> tuple[list[float], list[float]]:
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    logs = state["log_history"]
    return [e["loss"] for e in logs if "loss" in e], [e["eval_loss"] for e in logs if "eval_loss" in e]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["zero3", "fsdp"])
def test_context_parallel_2_under_sharding_follows_one_process_step_by_step(
    tmp_path: Path, base_dir: Path, sharding: str
) -> None:
    """Two plain SGD steps (the update shows the gradient itself) with the chunked loss, which takes each
    share's shifted labels: ZeRO-3 or FSDP over a context-parallel group of 2, with the tiled MLP (whose
    weight gradients, summed over the chunks, must reach ZeRO-3's and FSDP2's reductions once) and gradient
    checkpointing (whose recomputation in the backward pass must exchange heads for tokens too), against one
    plain process. Per-step losses, evaluation losses and the saved weights agree."""
    from safetensors.torch import load_file

    common = {**SGD_STEPS, "base_model": str(base_dir), "train_from_scratch": False,
              "dataset_prepared_path": str(tmp_path / "prepared")}  # fmt: skip
    _train(write_config(tmp_path / "one.yml", tiny_config(tmp_path / "one", **common)), [sys.executable])
    shard = {"deepspeed": str(REPO / "deepspeed_configs/zero3.json")} if sharding == "zero3" else \
        {"fsdp": ["full_shard", "auto_wrap"]}  # fmt: skip
    cfg = tiny_config(tmp_path / "cp", context_parallel_size=2, tiled_mlp=True, tiled_mlp_num_shards=3,
                      gradient_checkpointing=True, **shard, **common)  # fmt: skip
    result = _train(write_config(tmp_path / "cp.yml", cfg), TORCHRUN)
    assert "context_parallel_size: 2 runs attention through our entry point" in result.stdout + result.stderr
    assert "MLPs run over 1/3 of the sequence at a time" in result.stdout + result.stderr
    (losses, evals), (cp_losses, cp_evals) = _history(tmp_path / "one/out"), _history(tmp_path / "cp/out")
    assert len(losses) == 2 and len(evals) >= 2
    assert cp_losses == pytest.approx(losses, rel=1e-5)
    assert cp_evals == pytest.approx(evals, rel=1e-5)
    initial = load_file(str(base_dir / "model.safetensors"))
    single, parallel = (load_file(str(tmp_path / run / "out/model.safetensors")) for run in ("one", "cp"))
    assert single.keys() == parallel.keys()
    for name, weight in single.items():
        start = initial.get(name)  # the embedding and head grew by the 2 ChatML tokens
        update = weight - start if start is not None and start.shape == weight.shape else weight
        tolerance = 1e-4 * float(update.abs().max()) + 1e-7
        torch.testing.assert_close(parallel[name], weight, rtol=0, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_resuming_a_context_parallel_run_continues_it_exactly(tmp_path: Path) -> None:
    """4 steps with CP 2, a checkpoint at step 2; a second run resumed from it logs the same losses for steps
    3 and 4 (the group's data loader skips the batches already trained, the same ones on both processes)."""
    common = {"max_steps": 4, "save_steps": 2, "sample_packing": True, "micro_batch_size": 2,
              "context_parallel_size": 2, "dataset_prepared_path": str(tmp_path / "prepared")}  # fmt: skip
    _train(write_config(tmp_path / "full.yml", tiny_config(tmp_path / "full", **common)), TORCHRUN)
    checkpoint = tmp_path / "full/out/checkpoint-2"
    resumed = tiny_config(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **common)
    _train(write_config(tmp_path / "resumed.yml", resumed), TORCHRUN)
    full = json.loads((tmp_path / "full/out/checkpoint-4/trainer_state.json").read_text())["log_history"]
    again = json.loads((tmp_path / "resumed/out/checkpoint-4/trainer_state.json").read_text())["log_history"]
    losses = {e["step"]: e["loss"] for e in full if "loss" in e}
    resumed_losses = {e["step"]: e["loss"] for e in again if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4]
    assert [resumed_losses[s] for s in (3, 4)] == pytest.approx([losses[s] for s in (3, 4)], rel=1e-5)
