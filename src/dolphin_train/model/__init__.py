"""Model stage: tokenizer (+ added tokens, chat template) and model (weights, precision, attention)."""
