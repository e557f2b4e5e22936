"""What the engine asks of a module: is it a linear layer (nn.Linear, GPT-2's
Conv1D, bitsandbytes' NF4 Linear4bit), what is its shape, and how to swap it
for another in a model.

A leaf: it imports nothing else of loralab, so layer, inject and quant can all
use it without importing each other.
"""

from __future__ import annotations

from torch import nn


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_4bit(module)


def base_shape(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of nn.Linear, GPT-2 Conv1D or bnb Linear4bit."""
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    if is_conv1d(base):  # GPT-2: weight is (in, out)
        return int(base.weight.shape[0]), int(base.nf)
    raise TypeError(f"cannot wrap {type(base).__name__}: not a linear layer")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
