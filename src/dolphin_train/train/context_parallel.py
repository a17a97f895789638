"""Context parallelism in training: which rows each process gets, and which of their tokens it computes.

With `context_parallel_size: N`, the world's processes form groups of N consecutive ranks (model/
context_parallel.py). The data loader treats a group as ONE data-parallel process (dp = world / N shards of
the data), so every process of a group receives the same rows; each then computes a contiguous 1/N of the
batch's tokens, the rows laid end to end (`cut_batch`). The cut may fall anywhere, inside a conversation
too: the labels are shifted (each position gets the next token of its row) BEFORE the cut, so the last
position of one share is trained on the first token of the next, and attention sees the whole sequence
with the boundaries computed from the uncut rows.

The loss stays the token-weighted mean of the whole global batch: each process sums the loss of its share's
trained tokens and divides by the global batch's trained-token count, which the Trainer gathers from every
process and divides by N (`get_cp_size`: the processes of a group count the same rows). The gradients each
process computes (through the all-to-all's backward) are its share's; DDP, ZeRO-3 and FSDP then reduce
them over every process as they do without context parallelism.
"""

from __future__ import annotations

from typing import Any

import torch

from dolphin_train.data.encode import IGNORE_INDEX
from dolphin_train.errors import EnvironmentProblem
from dolphin_train.model.attention import BOUNDARY_KEYS
from dolphin_train.model.context_parallel import ContextGroup


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target: the next label of its row (none for a row's last position)."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def cut_batch(batch: dict[str, Any], cp: ContextGroup, pad_token_id: int) -> dict[str, Any]:
    """This process's share of a collated batch: the rows laid end to end as one row of B x L tokens (which is
    how the boundaries already count them), padded to a multiple of N with a padding sequence of its own,
    then its contiguous 1/N. `labels` and `shift_labels` are the shifted labels (what the loss compares each
    position's prediction with); the boundary keys are the whole batch's."""
    if any(name not in batch for name in BOUNDARY_KEYS):
        raise EnvironmentProblem("context_parallel_size needs the sequence boundaries in every batch: the model "
                                 "does not run our variable-length attention (see the log's attention line)")
    ids, targets, positions = (t.reshape(1, -1) for t in (batch["input_ids"], shifted_labels(batch["labels"]),
                                                          batch["position_ids"]))  # fmt: skip
    cu, longest = batch[BOUNDARY_KEYS[0]], int(batch[BOUNDARY_KEYS[2]])
    extra = -ids.shape[1] % cp.size
    if extra:  # a padding sequence of its own: positions restart, nothing trained
        ids = torch.cat([ids, ids.new_full((1, extra), pad_token_id)], dim=1)
        targets = torch.cat([targets, targets.new_full((1, extra), IGNORE_INDEX)], dim=1)
        positions = torch.cat([positions, torch.arange(extra, device=positions.device)[None]], dim=1)
        cu = torch.cat([cu, cu.new_tensor([ids.shape[1]])])
        longest = max(longest, extra)
    share = ids.shape[1] // cp.size
    mine = slice(cp.rank * share, (cp.rank + 1) * share)
    local = targets[:, mine]
    cut = {name: value for name, value in batch.items() if name not in ("input_ids", "labels", "position_ids")}
    cut.update(input_ids=ids[:, mine], position_ids=positions[:, mine], labels=local, shift_labels=local)
    cut.update(zip(BOUNDARY_KEYS, (cu, cu, longest, longest), strict=True))
    return cut


def share_rows_within_groups(dataloader: Any, cp: ContextGroup) -> Any:
    """Make accelerate's prepared data loader deal batches to world / N data-parallel ranks, the processes of
    a context-parallel group being one of them (its `BatchSamplerShard`'s public `num_processes` and
    `process_index`, as transformers itself adjusts them for samplers that are already rank-aware)."""
    import torch.distributed as dist
    from accelerate.data_loader import BatchSamplerShard

    shard = getattr(dataloader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard):
        raise EnvironmentProblem("context_parallel_size: the data loader is not sharded by batches (an iterable "
                                 "dataset?), so the processes of a group would not get the same rows")  # fmt: skip
    shard.num_processes = dist.get_world_size() // cp.size
    shard.process_index = dist.get_rank() // cp.size
    return dataloader
