"""The PyTorch-varlen attention backend's plumbing (boundaries, layouts, GQA, registration), checked on
the CPU with a reference kernel in place of the CUDA flash kernel; scripts/gpu_check.sh runs the real one."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dolphin_train.data.packing import PackedRows
from dolphin_train.model.attention import cu_seqlens_from_position_ids, register_packed_attention
from dolphin_train.train.collator import ChatCollator

CALLS: list[int] = []


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """Causal attention within each [cu[i], cu[i+1]) segment, by PyTorch SDPA."""
    assert window_size == (-1, 0)
    CALLS.append(len(cu_q) - 1)
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
        res = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        out[a:b] = res[0].transpose(0, 1)
    return out


def test_cu_seqlens_from_restarting_positions_and_rows() -> None:
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    cu, longest = cu_seqlens_from_position_ids(position_ids)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4


def test_varlen_backend_matches_sdpa_on_packed_rows() -> None:
    register_packed_attention("test_varlen", reference_varlen)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(3)
    convs = [{"input_ids": rng.integers(3, 97, n).tolist(), "labels": [-100] * n} for n in (9, 4, 15, 6, 3)]

    class Rows:
        def __getitem__(self, idx):
            return {k: [convs[i][k] for i in idx] for k in ("input_ids", "labels")}

    packed = PackedRows(Rows(), layout=type("P", (), {"bins": [[0, 1], [2, 3, 4]]})())
    batch = ChatCollator(pad_token_id=0)([packed[0], packed[1]])
    with torch.no_grad():
        sdpa = model(**batch).logits
        model.set_attn_implementation("test_varlen")
        varlen = model(**batch).logits
    assert CALLS == [6, 6]  # both layers ran the varlen kernel over 6 segments (5 conversations + padding)
    torch.testing.assert_close(varlen, sdpa, atol=1e-5, rtol=1e-5)
