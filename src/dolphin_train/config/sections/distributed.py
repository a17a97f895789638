"""The distributed keys: DeepSpeed, FSDP, DDP, and launching on Ray."""

from __future__ import annotations

from typing import Any, Literal

from dolphin_train.config.keys import Section, key

# transformers' FSDP sharding options (FSDP1 names; FSDP2 reads full_shard/shard_grad_op as resharding or not).
FSDP_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")


class DistributedKeys(Section):
    """How the model is sharded and the processes launched."""

    deepspeed: str | dict[str, Any] | None = key(
        None,
        "DeepSpeed config: a JSON file path or an inline mapping (see `deepspeed_configs/`).",
        "distributed",
    )
    fsdp: list[str] | str | None = key(
        None,
        "Fully sharded data parallel, the alternative to DeepSpeed: transformers' options, e.g. "
        "`[full_shard, auto_wrap]` (add `offload` to keep parameters on the CPU).",
        "distributed",
    )
    fsdp_config: dict[str, Any] | None = key(
        None,
        "FSDP settings passed to transformers (`fsdp_` prefixes accepted, as axolotl writes them); FSDP2 "
        "(`version: 2`) unless set otherwise; layers to wrap default to the model's own.",
        "distributed",
    )
    fsdp_version: Literal[1, 2] | None = key(
        None,
        "axolotl's newer FSDP spelling: `fsdp_version` with `fsdp_config` and no `fsdp` list turns FSDP on, "
        "its options read from `fsdp_config` (`sharding_strategy`, else `reshard_after_forward: false` for "
        "sharding gradients and optimizer states only, else full sharding; `offload_params: true` is `offload`, "
        "with either spelling); the version goes to `fsdp_config`.",
        "distributed",
    )
    ddp_find_unused_parameters: bool | None = key(
        None,
        "DDP's search for parameters that get no gradient (needed only when some do, e.g. unused layers); "
        "default off: it costs a graph traversal per step.",
        "distributed",
    )
    context_parallel_size: int = key(
        1,
        "Context parallelism (axolotl's key): each sequence is spread over this many processes, each computing a "
        "contiguous 1/N of the batch's tokens, with an all-to-all over attention heads around our attention "
        "entry point (Ulysses-style). The processes of a group get the same rows, so data parallelism is "
        "world size / N; the attention heads must divide by N. Exact on packed rows. See docs/context-parallelism.md.",
        "distributed",
        ge=1,
    )
    sequence_parallel_degree: int | None = key(
        None, "axolotl's former name of `context_parallel_size`, read as it.", "distributed", ge=1
    )
    use_ray: bool = key(
        False,
        "Launch the run with Ray Train (axolotl's key): `dolphin-train CONFIG` starts `ray_num_workers` training "
        "processes on the Ray cluster that RAY_ADDRESS names (a local one otherwise), joined in one process "
        "group; `output_dir` must be storage every worker reaches. Needs `pip install 'dolphin-train[ray]'`.",
        "distributed",
    )
    ray_num_workers: int | None = key(None, "Ray's training processes (default 1), one per GPU.", "distributed", ge=1)
    ray_run_name: str | None = key(
        None, "Name of the Ray run; Ray's own records go to `output_dir/ray/<name>`.", "distributed"
    )
    resources_per_worker: dict[str, float] | None = key(
        None,
        "Ray resources each worker holds (default `{GPU: 1}` where the launching machine has a GPU, else "
        "`{CPU: 1}`); a `GPU` entry puts the workers on GPUs.",
        "distributed",
    )
    local_rank: int | None = key(
        None,
        "Set by the launcher (torchrun, accelerate); leave it empty in the file.",
        "distributed",
        unsupported=True,
    )

    @property
    def fsdp_version_in_use(self) -> int | None:
        """The FSDP version a run with `fsdp` uses (None without FSDP): `fsdp_config`'s `version` (axolotl's
        `fsdp_` prefix accepted), else `fsdp_version`, else 2. Read by the checks and the Trainer's settings."""
        if not self.fsdp:
            return None
        settings = {k.removeprefix("fsdp_"): v for k, v in (self.fsdp_config or {}).items()}
        return int(settings.get("version", self.fsdp_version or 2))

    @property
    def cp_size(self) -> int:
        """Processes per context-parallel group: `context_parallel_size`, or its former name."""
        return self.sequence_parallel_degree or self.context_parallel_size
