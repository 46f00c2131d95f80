"""Evaluation of fine-tuned language models: generation, task metrics, code execution, judging, perplexity."""
