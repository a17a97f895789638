"""Train stage: a thin wrapper over transformers.Trainer (arguments, collator, schedule, summaries)."""
