"""The schema's keys, one file per section; `config/schema.py` composes them into `Config`.

- model.py: the base model and its config, tokenizer, added tokens, bitsandbytes quantisation (`ModelKeys`).
- adapters.py: LoRA and its variants (`AdapterKeys`), the fused LoRA kernels (`LoRAKernelKeys`), `peft:`.
- kernels.py: loading switches, attention backends, Liger kernels and axolotl's plugins, `unfrozen_parameters`,
  the weights' dtype (`KernelKeys`).
- compat.py: axolotl-only keys accepted for compatibility (`CompatKeys`, `DeferredInitKeys`).
- data.py: datasets, chat template, sequence length, packing, the cache (`DataKeys`, `DatasetConfig`).
- training.py: batch, schedule, optimizer, precision, memory modes, LISA, ReLoRA, sparse fine-tuning (`TrainingKeys`).
- tracking.py: the reference's `logging` keys: logging, evaluation, checkpoints saved, wandb and metrics
  (`LoggingKeys`).
- distributed.py: DeepSpeed, FSDP, DDP, Ray (`DistributedKeys`).

A new key goes into the class of its topic, where it should appear in that section's reference table (the
`section=` argument of `key()` picks the table; the field order within a table is the declaration order, class by
class in `Config`'s bases, last base first). A check of one key's value is a `field_validator` next to the key;
a check that reads keys of several sections is a method of `CrossSectionChecks` in `config/checks.py`.
"""
