"""Can DeepSpeed's ALST (Ulysses sequence parallelism for transformers models, `UlyssesSPAttentionHF`) serve
`context_parallel_size` on the CPU? Under `torchrun --nproc_per_node 2` (gloo), the tiny Llama's loss and
gradients on packed rows (3 rows of 9 tokens, several conversations each), computed whole and with ALST's
attention wrapper around a transformers backend, each process holding half of every row (ALST's own
sharding: the sequence dimension of each row). Prints what runs and how far the results are from one
process's. Run:
    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 scripts/measure_alst_on_cpu.py [CORE]
CORE: the transformers attention ALST wraps (default sdpa; `dolphin_sdpa_varlen` is our entry point).
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.distributed as dist

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.model.attention import register_backend
from dolphin_train.train.collator import ChatCollator

CONVERSATIONS = [[4, 6], [10], [2, 8]]  # rows of 10 tokens: ALST needs each row's length to divide by N


def rows() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(3)
    found = []
    for lengths in CONVERSATIONS:
        ids = torch.randint(3, 2000, (sum(lengths),), generator=generator).tolist()
        positions = [p for n in lengths for p in range(n)]
        labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, positions, strict=True)]
        found.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return found


def model(core: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         attn_implementation=core)  # fmt: skip
    return LlamaForCausalLM(config)


def loss_and_grads(net: torch.nn.Module, batch: dict, trained: int) -> tuple[torch.Tensor, dict]:
    net.zero_grad()
    logits = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["shift_labels"].flatten(),
                                             reduction="sum") / trained  # fmt: skip
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in net.named_parameters()}


def main(core: str) -> None:
    dist.init_process_group("gloo")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # ALST's groups are made through deepspeed.comm
    rank, world = dist.get_rank(), dist.get_world_size()
    if core.startswith("dolphin_"):
        register_backend(core)
    batch = ChatCollator(pad_token_id=0, pad_to_multiple_of=1)(rows())
    batch["shift_labels"] = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    trained = int(batch["shift_labels"].ne(IGNORE_INDEX).sum())
    net = model(core)
    whole_loss, whole_grads = loss_and_grads(net, batch, trained)
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        UlyssesSPAttentionHF.register_with_transformers(net, core, sequence_parallel_size=world,
                                                        micro_batch_size=len(CONVERSATIONS))  # fmt: skip
        net.config._attn_implementation = core  # ALST replaces the core's entry in transformers' registry
        length = batch["input_ids"].shape[1] // world
        mine = {k: v[:, rank * length:(rank + 1) * length] for k, v in batch.items()}
        loss, grads = loss_and_grads(net, mine, trained)
        dist.all_reduce(loss)
        for grad in grads.values():
            dist.all_reduce(grad)
        worst = max(float((grads[n] - g).abs().max() / g.abs().max()) for n, g in whole_grads.items())
        if rank == 0:
            print(f"ALST with core {core}: ran on the CPU; loss {float(loss):.7f} vs one process "
                  f"{float(whole_loss):.7f}; worst gradient relative difference {worst:.2e}")
    except Exception as exc:  # the measurement is whether it runs at all
        if rank == 0:
            print(f"ALST with core {core}: fails on the CPU: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sdpa")
