"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation) on top of PEFT and transformers."""

__version__ = "0.1.0"
