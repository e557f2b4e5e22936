"""Load the model for a method: what is trained, what is frozen, what is quantized."""

from __future__ import annotations

import torch

from loralab.errors import LoralabError
from loralab.models import quiet_transformers
from loralab.train.gated_mlp import use_fused_gated_mlp


def compute_dtype(cfg, device: str) -> torch.dtype:
    """QLoRA compute dtype: bf16 on GPUs that support it, else fp32 (bf16 matmuls
    on CPUs without AMX run far slower than fp32)."""
    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_for_method(cfg, device: str, label_map=None):
    """(model, tokenizer) with the method applied; all else frozen."""
    from loralab.models import load_model

    kwargs = {}
    if cfg.task == "classify":
        kwargs["id2label"] = label_map.id2label
    quantize = cfg.method == "qlora"
    with quiet_transformers():
        model, tok = load_model(cfg.model, cfg.task, quantize_4bit=quantize,
                                compute_dtype=compute_dtype(cfg, device) if quantize else None,
                                **kwargs)
    apply_method(model, cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.method)
    return model, tok


def apply_method(model, cfg) -> None:
    from loralab.lora import LoRAConfig, default_modules_to_save, inject_lora

    use_fused_gated_mlp(model)  # SwiGLU/GeGLU MLPs keep gate and up, not act(gate)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    if cfg.method == "head":
        heads = default_modules_to_save(model, "classify")
        if not heads:
            raise LoralabError(f"model {cfg.model!r} has no classification head to train. "
                               "Use --method lora or full.")
        # no LoRA layer, only a trainable copy of the head saved in PEFT format
        inject_lora(model, LoRAConfig(r=cfg.rank, alpha=cfg.alpha, task="classify"),
                    target_names=[])
        return
    inject_lora(model, cfg.lora_config())


def enable_checkpointing(model, method: str) -> None:
    """Recompute activations in backward; with a frozen embedding the inputs
    need grads so checkpointed blocks still propagate to the adapters."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LoralabError(f"{type(model).__name__} does not support gradient checkpointing. "
                           "Drop --gradient-checkpointing.")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora", "head"):
        model.enable_input_require_grads()


