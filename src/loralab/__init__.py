"""loralab: fine-tune Hugging Face models by full fine-tuning, LoRA and QLoRA,
and measure, side by side, what each costs and buys."""

__version__ = "0.1.0"
