"""`flex_attn_compile_kwargs`: flex attention compiled with the user's torch.compile arguments. On the CPU,
a forward pass (flex attention has no CPU backward) through the compiled backend equals SDPA's on packed rows,
the arguments reach torch.compile, and transformers' own default compilation is not used."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from dolphin_train.config.load import validate_mapping
from dolphin_train.config.resolve import FLEX_COMPILED, resolve_runtime
from dolphin_train.config.schema import FLEX_COMPILE_KEYS
from dolphin_train.errors import ConfigError

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}


def test_the_accepted_keys_are_torch_compile_arguments() -> None:
    assert set(FLEX_COMPILE_KEYS) <= set(inspect.signature(torch.compile).parameters)


def test_the_kwargs_select_the_compiled_flex_backend() -> None:
    kwargs = {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}
    cfg = validate_mapping({**BASE, "attn_implementation": "flex_attention", "flex_attn_compile_kwargs": kwargs})
    runtime = resolve_runtime(cfg)
    assert runtime.attn_implementation == FLEX_COMPILED and "flex_attn_compile_kwargs" in runtime.attention_note
    plain = validate_mapping({**BASE, "attention": "flex"})
    assert resolve_runtime(plain).attn_implementation == "flex_attention"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"flex_attn_compile_kwargs": {"dynamic": False}}, "set attn_implementation: flex_attention"),
        ({"attn_implementation": "sdpa", "flex_attn_compile_kwargs": {}}, "set attn_implementation: flex_attention"),
        ({"attention": "flex", "flex_attn_compile_kwargs": {"dynamik": False}}, "dynamik is not a torch.compile"),
        ({"attention": "flex", "flex_attn_compile_kwargs": {"mode": "fast"}}, "'fast' is not a torch.compile mode"),
    ],
)
def test_flex_kwargs_refused_where_they_would_not_apply(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_mapping({**BASE, **keys})


def test_compiled_flex_attention_forward_equals_sdpa_and_uses_the_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import flex_attention as transformers_flex

    from dolphin_train.model.attention import register_compiled_flex_attention

    seen: list[tuple[str, dict[str, Any]]] = []
    real_compile = torch.compile

    def recording_compile(fn: Any, **kwargs: Any) -> Any:
        seen.append((getattr(fn, "__name__", ""), kwargs))
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    # "eager": the compiled graph runs without code generation (fast on the CPU); the other arguments as set.
    kwargs = {"backend": "eager", "dynamic": False, "fullgraph": True}
    monkeypatch.setattr(transformers_flex.WrappedFlexAttention, "_is_flex_compiled", False)
    name = register_compiled_flex_attention(kwargs)

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    reference = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    flex = LlamaForCausalLM._from_config(config, attn_implementation=name).eval()
    flex.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 64, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two packed conversations
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions).logits
        got = flex(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Our attention function, compiled with the kwargs; never the kernel alone (as transformers does, with
    # its own arguments). transformers' block-mask builder compiles separately.
    assert ("flex_core", kwargs) in seen and not any(fn == "flex_attention" for fn, _ in seen), seen
    assert transformers_flex.WrappedFlexAttention._is_flex_compiled is False  # not transformers' default compile
    # Inside a compiled decoder layer (`torch_compile`), the attention stays its own compiled graph.
    for layer in flex.model.layers:
        layer.compile(backend="eager", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(flex(input_ids=ids, position_ids=positions).logits, expected, atol=1e-5, rtol=1e-5)
    assert [kw for fn, kw in seen if fn == "flex_core"] == [kwargs]  # compiled once, with the user's arguments
