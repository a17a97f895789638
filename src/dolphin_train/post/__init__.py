"""After training: merge a LoRA adapter into its base model, and chat with the result."""
