"""Training: one loop for full fine-tuning, LoRA, QLoRA and head-only, for
classification and instruction tuning, measured the same way every run."""

from loralab.train.run import run_training

__all__ = ["run_training"]
