"""Headless engine: data, tokenizer, model, training, evaluation, checkpoints, the engine process."""
