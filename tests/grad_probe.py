"""Run one optimizer step of a config, evaluate, and save the gradients, the logged loss and the eval
loss and metrics (rank 0).

Used by tests/test_distributed_loss.py under `torchrun` and as a plain process:
    python tests/grad_probe.py CONFIG.json OUT.pt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from dolphin_train.config.load import validate_mapping
from dolphin_train.process_group import leaving_the_process_group_at_the_end
from dolphin_train.recipe import set_up_run


class CaptureGradients(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            inner = getattr(model, "module", model)  # DDP wraps the model; its gradients are already reduced
            self.grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}


def main(config_path: str, out_path: str) -> None:
    cfg = validate_mapping(json.loads(Path(config_path).read_text()))
    with leaving_the_process_group_at_the_end():
        _probe(cfg, out_path)


def _probe(cfg, out_path: str) -> None:
    run = set_up_run(cfg)
    capture = CaptureGradients()
    run.trainer.add_callback(capture)
    run.trainer.train()
    metrics = run.trainer.evaluate() if run.rows.eval is not None else {}
    if run.trainer.is_world_process_zero():
        losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
        found = {"grads": capture.grads, "loss": losses[0], "eval_loss": metrics.get("eval_loss"),
                 "eval_metrics": metrics, "world_size": run.trainer.args.world_size}  # fmt: skip
        torch.save(found, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
