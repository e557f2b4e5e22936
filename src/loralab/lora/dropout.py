"""Dropout with a cheaper mask on CPU.

``torch.nn.Dropout`` draws its mask with ``bernoulli_``, which on CPU costs one
32-bit Mersenne-twister draw and a float compare per element, and a LoRA step
runs a dropout on every adapted layer's input besides the model's own: a large
share of the step (BENCHMARKS.md, "CPU training changes: what each saved").
Here one 64-bit draw makes the mask of four elements: its bits are split into
four 16-bit chunks, each compared with ``p`` at a resolution of 2^-15 (so
p = 0.1 drops 0.100006 of the elements), and kept values are scaled by
1 / (1 - p) as usual. The draws come
from torch's default generator, so ``torch.manual_seed`` and checkpointed RNG
state make runs repeatable and resumable as before. On GPUs, torch's own
(Philox) dropout is already fast and is used unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_RESOLUTION = 1 << 15  # each 16-bit chunk is compared with p at 15-bit resolution


def keep_mask(numel: int, p: float) -> torch.Tensor:
    """A flat bool tensor of ``numel`` elements, each True with probability ~1 - p."""
    words = (numel + 3) // 4
    # random_() on int64 fills bits 0..62; shifted left by one, the zero bit
    # moves to bit 0: the lowest 16-bit chunk holds 15 random bits above it, the
    # other three 16 random bits. Against an even threshold every chunk is kept
    # with the same probability.
    bits = torch.empty(words, dtype=torch.int64).random_().bitwise_left_shift_(1)
    threshold = 2 * round(p * _RESOLUTION) - (1 << 15)  # even: P(chunk >= t) = 1 - p
    if threshold > torch.iinfo(torch.int16).max:  # p rounds to 1: the int16 compare would wrap
        return torch.zeros(numel, dtype=torch.bool)
    return (bits.view(torch.int16) >= threshold)[:numel]


def keep_mask_like(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool tensor shaped like ``x``, each element True with probability ~1 - p:
    the CPU mask above, or a uniform draw compared with ``p`` on other devices."""
    if x.device.type == "cpu":
        return keep_mask(x.numel(), p).view(x.shape)
    return torch.rand(x.shape, device=x.device) >= p


def as_float(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``keep`` (bool) as 0/1 values of ``dtype``, to multiply by.

    A bool operand costs torch's CPU kernels a slow cast: ``keep.to(float)`` and
    the cast hidden inside ``x * keep`` run several times slower than the same
    cast from the mask's bytes read as ``uint8`` (BENCHMARKS.md, "The dropout
    mask's passes inside training"). The values, and so every product, are
    the same."""
    return keep.view(torch.uint8).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or p >= 1:
        return F.dropout(x, p, training)
    scale = as_float(keep_mask_like(x, p), x.dtype).mul_(1.0 / (1.0 - p))
    return x * scale  # autograd keeps ``scale`` for the backward pass


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the CPU mask above (same ``p``, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Switch every plain ``nn.Dropout`` in ``model`` to :class:`Dropout` in place;
    returns how many. Parameters, state dict and saved configs are unchanged."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = Dropout
            n += 1
    return n
