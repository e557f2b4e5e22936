"""loralab: fine-tune Hugging Face models by full fine-tuning, LoRA and QLoRA,
and measure, side by side, what each costs and buys."""

__version__ = "0.1.0"

from loralab.allocator import prefer_huge_pages

prefer_huge_pages()  # before torch's first allocation
