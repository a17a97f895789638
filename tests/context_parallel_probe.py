"""Context parallelism at the model level, under `torchrun --nproc_per_node N` (gloo on the CPU): the tiny
Llama's loss and gradients on a packed batch, computed (1) whole by every process, as one process would,
and (2) spread over the N processes (each its share of the tokens, the attention kernel exchanging heads for
tokens). Rank 0 saves both. Used by tests/test_context_parallel.py:
    python -m torch.distributed.run --nproc_per_node 2 tests/context_parallel_probe.py KV_HEADS OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.model.attention import register_packed_attention
from dolphin_train.model.attention_kernels import sdpa_kernel
from dolphin_train.model.context_parallel import ContextParallelKernel, join_context_group, sharded_sequence
from dolphin_train.train.collator import ChatCollator
from dolphin_train.train.context_parallel import cut_batch, shifted_labels

BACKEND = "dolphin_cp_probe"
# 3 rows of 9 tokens, conversations of 4+5, 9, and 2+7 tokens: 27 tokens padded to 28, so with 2 processes
# the cut falls at token 14, inside the third row's second conversation (position 5 of its 7 tokens).
CONVERSATIONS = [[4, 5], [9], [2, 7]]


def packed_rows() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(3)
    rows = []
    for lengths in CONVERSATIONS:
        ids = torch.randint(3, 2000, (sum(lengths),), generator=generator).tolist()
        positions = [p for n in lengths for p in range(n)]
        labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, positions, strict=True)]  # prompts untrained
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


def tiny_llama(kv_heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16)  # fmt: skip
    config._attn_implementation = BACKEND
    return LlamaForCausalLM(config)


def loss_and_grads(model: torch.nn.Module, batch: dict, trained: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=trained).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main(kv_heads: int, out_path: str) -> None:
    dist.init_process_group("gloo")
    register_packed_attention(BACKEND, ContextParallelKernel.around(sdpa_kernel()))
    cp = join_context_group(dist.get_world_size())
    model = tiny_llama(kv_heads)
    batch = ChatCollator(pad_token_id=0, pad_to_multiple_of=1, boundaries=True)(packed_rows())
    trained = int(shifted_labels(batch["labels"]).ne(IGNORE_INDEX).sum())
    whole_loss, whole_grads = loss_and_grads(model, batch, trained)

    share = cut_batch(batch, cp, pad_token_id=0)
    with sharded_sequence(cp):
        share_loss, share_grads = loss_and_grads(model, share, trained)
    total = torch.tensor([share_loss])
    dist.all_reduce(total)  # each process's loss is its share's sum over the batch's trained tokens
    for grad in share_grads.values():
        dist.all_reduce(grad)
    if dist.get_rank() == 0:
        torch.save({"whole": (whole_loss, whole_grads), "parallel": (float(total), share_grads),
                    "share_tokens": share["input_ids"].shape[1], "batch_tokens": batch["input_ids"].numel()},
                   out_path)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
