"""AdamW over the trainable parameters only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   lora_plus_ratio: float | None = None):
    """AdamW with no decay on biases and norm weights (BERT's recipe).

    Frozen parameters are never handed to the optimizer, so they get neither
    gradient buffers nor Adam moments. ``lora_plus_ratio`` (LoRA+, Hayou et al.,
    2024): every ``lora_B`` matrix learns at ratio x lr, all else at lr, as their
    own parameter groups (the scheduler scales each group's rate alike). peft's
    ``create_loraplus_optimizer`` also puts 1-D parameters (biases, norms, DoRA's
    magnitude) in B's group; the paper speaks of B only, and so does this.
    """
    groups = []
    for rate, params in _lr_groups(model, lr, lora_plus_ratio):
        decay, no_decay = [], []
        for name, p in params:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups += [g for g in ({"params": decay, "weight_decay": weight_decay, "lr": rate},
                               {"params": no_decay, "weight_decay": 0.0, "lr": rate})
                   if g["params"]]
    if not groups:
        raise RuntimeError("no trainable parameters")
    # the fused kernel updates all tensors in one pass (CPU since torch 2.4, CUDA)
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def _lr_groups(model, lr: float, lora_plus_ratio: float | None):
    """``[(lr, [(name, param)])]``: one group, or LoRA+'s A-side and B-side."""
    params = trainable_parameters(model)
    if not lora_plus_ratio:
        return [(lr, params)]
    is_b = [("lora_B" in name.split(".")) for name, _ in params]
    rest = [np for np, b in zip(params, is_b) if not b]
    b_side = [np for np, b in zip(params, is_b) if b]
    return [(lr, rest), (lr * lora_plus_ratio, b_side)]


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak lr at step ``s``: linear warmup, then decay to 0."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress
    return f


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))
