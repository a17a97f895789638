"""`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`: the fused LoRA functions against peft's own forward
and backward (values and every gradient), the activation memory they keep, and a training run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from dolphin_train.config.load import validate_mapping
from dolphin_train.errors import ConfigError
from dolphin_train.model.lora_kernels import use_fused_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(hidden_act: str = "silu", targets: list[str] = TARGETS, dtype: torch.dtype = torch.float32):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, hidden_act=hidden_act)  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    # init_lora_weights=False: B is random too, so that every LoRA gradient is non-zero and compared
    settings = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, settings)


def loss_and_grads(model, ids: torch.Tensor, autocast: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(plain, fused, autocast: bool = False, tolerance: float = 1e-5) -> None:
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(plain, ids, autocast)
    fused_loss, fused_grads = loss_and_grads(fused, ids, autocast)
    assert fused_loss == pytest.approx(loss, rel=tolerance)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 2 * len(TARGETS)
    for name, grad in grads.items():
        error = (fused_grads[name] - grad).abs().max() / grad.abs().max()
        assert error < tolerance * 10, name


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_fused_lora_gives_peft_values_and_gradients(act: str) -> None:
    plain = lora_model(act)
    fused = use_fused_lora(copy.deepcopy(plain), mlp=True, qkv=True, o=True)
    layer = fused.base_model.model.model.layers[0]
    assert type(layer.mlp).__name__ == "FusedLlamaMLP" and type(layer.self_attn.q_proj).__name__ == "FusedLinear"
    assert_same_training_signal(plain, fused)


def test_fused_lora_under_bf16_autocast_matches_peft() -> None:
    plain = lora_model()
    fused = use_fused_lora(copy.deepcopy(plain), mlp=True, qkv=True, o=True)
    assert_same_training_signal(plain, fused, autocast=True, tolerance=2e-2)


@pytest.mark.parametrize("layout", ["standard", "cpu-packed"])
def test_fused_lora_over_a_4bit_base_matches_peft(layout: str) -> None:
    """Both of bitsandbytes' layouts, on any CPU: the packed one (what an evaluation pass leaves on an AVX-512
    BF16 CPU unless repacking is off) is made explicitly in the fused model; peft's reference trains over the
    same values in the standard layout (the packed kernel has no backward)."""
    import peft
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from dolphin_train.model.quantised import four_bit_linears, keep_standard_layout, to_standard_layout

    # 192, not 160: bitsandbytes packs only rows of whole 64-value blocks
    config = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory := Path(__import__("tempfile").mkdtemp()))
    quantised = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(directory, quantization_config=quantised, dtype=torch.float32)
    keep_standard_layout(base)  # as load_model does: the layout stays put whatever this CPU is
    settings = peft.LoraConfig(r=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    plain = peft.get_peft_model(base, settings)
    fused = use_fused_lora(copy.deepcopy(plain), mlp=True, qkv=True, o=True)
    assert type(fused.base_model.model.model.layers[0].mlp).__name__ == "FusedLlamaMLP"
    if layout == "cpu-packed":
        from bitsandbytes.functional import _convert_weight_packed_for_cpu

        for model in (plain, fused):
            for layer in four_bit_linears(model):
                layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
                    layer.weight.data, layer.weight.quant_state
                )
        for layer in four_bit_linears(plain):
            to_standard_layout(layer.weight)  # the same values, bfloat16 block scales included
    assert_same_training_signal(plain, fused, tolerance=1e-4)


def saved_bytes(module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of `module(x)`, parameters left out."""
    parameters = {p.untyped_storage()._cdata for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in parameters:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_the_fused_mlp_keeps_half_the_activations() -> None:
    plain = lora_model()
    fused = use_fused_lora(copy.deepcopy(plain), mlp=True, qkv=False, o=False)
    x = torch.randn(4, 256, 64, requires_grad=True)
    kept = saved_bytes(plain.base_model.model.model.layers[0].mlp, x)
    fused_kept = saved_bytes(fused.base_model.model.model.layers[0].mlp, x)
    tokens, intermediate = 4 * 256, 160
    # peft: gate, up, act(gate), their product (+ x and rank-sized ones); fused: gate and up (+ the same)
    assert kept - fused_kept == pytest.approx(2 * tokens * intermediate * 4, rel=0.02)
    assert fused_kept < 0.6 * kept


def test_each_layer_falls_back_to_peft_where_fusing_would_change_the_result() -> None:
    fused = use_fused_lora(lora_model(), mlp=True, qkv=True, o=True)
    q_proj = fused.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 4, 64, requires_grad=True)
    assert q_proj(x).grad_fn.name() == "FusedLoRAProjectionBackward"
    with fused.disable_adapter():  # the base model alone: peft's path
        assert q_proj(x).grad_fn.name() != "FusedLoRAProjectionBackward"
    q_proj.lora_dropout["default"] = torch.nn.Dropout(0.5)  # dropout: peft's path
    assert q_proj(x).grad_fn.name() != "FusedLoRAProjectionBackward"


def test_the_plan_counts_what_the_fused_mlp_keeps(tmp_path: Path) -> None:
    from dolphin_train.plan.report import make_plan, parse_memory

    def activations(**keys) -> int:
        raw = tiny_config(tmp_path, adapter="lora", lora_target_linear=True, lora_dropout=0.0, **keys)
        return make_plan(validate_mapping(raw), gpus=1, gpu_memory=parse_memory("80GB")).memory.activations

    assert activations(lora_mlp_kernel=True) < 0.95 * activations()


def test_an_mlp_of_another_shape_is_refused_before_training() -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    from dolphin_train.errors import EnvironmentProblem

    class SumMLP(LlamaMLP):  # gate and up added, not multiplied: the fused function would compute otherwise
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = lora_model()
    model.base_model.model.model.layers[0].mlp.__class__ = SumMLP
    with pytest.raises(EnvironmentProblem, match="lora_mlp_kernel: SumMLP does not compute"):
        use_fused_lora(model, mlp=True, qkv=False, o=False)


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ({"lora_mlp_kernel": True}, "set adapter: lora or qlora"),
        ({"lora_qkv_kernel": True, "adapter": "lora", "lora_dropout": 0.05}, "set lora_dropout: 0"),
        ({"lora_o_kernel": True, "adapter": "lora", "load_in_8bit": True}, "not for 8-bit base weights"),
    ],
)
def test_kernel_keys_are_checked(tmp_path: Path, keys: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        validate_mapping(tiny_config(tmp_path, **keys))


def test_a_run_with_every_kernel_trains_as_peft_does(tmp_path: Path) -> None:
    from dolphin_train.recipe import set_up_run

    def losses(path: Path, **keys) -> list[float]:
        raw = tiny_config(path, max_steps=4, adapter="lora", lora_r=8, lora_target_linear=True, lora_dropout=0.0,
                          micro_batch_size=2, train_from_scratch=True, **keys)  # fmt: skip
        run = set_up_run(validate_mapping(raw))
        run.trainer.train()
        mlp = run.trainer.model.base_model.model.model.layers[0].mlp
        return [h["loss"] for h in run.trainer.state.log_history if "loss" in h], type(mlp).__name__

    plain, plain_mlp = losses(tmp_path / "plain")
    fused, fused_mlp = losses(tmp_path / "fused", lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True,
                              gradient_checkpointing=True)
    assert (plain_mlp, fused_mlp) == ("LlamaMLP", "FusedLlamaMLP")
    assert fused == pytest.approx(plain, rel=1e-4)
