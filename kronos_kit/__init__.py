"""kronos-kit: notebook-first, two-stage finetuning of Kronos (tokenizer first, then predictor)."""

__version__ = "0.1.0"
