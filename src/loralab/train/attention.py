"""Attention for CPU training with attention dropout (BERT-style encoders).

With ``dropout_p > 0`` torch's ``scaled_dot_product_attention`` has no fused
CPU kernel: it takes its math path, which draws the dropout mask with
``bernoulli_`` and runs a "safe" softmax (an ``all`` and two ``where`` over
the scores to zero fully masked rows), a share of every LoRA step on CPU
(BENCHMARKS.md, "CPU training changes: what each saved"). Here the
same math is spelled out as transformers' eager attention does it (masked
positions at the dtype's minimum, plain softmax) with
:mod:`loralab.lora.dropout`'s cheaper mask. Every other case — no dropout
(eval), GPUs, causal or grouped-query attention, position biases, soft-capping —
goes to transformers' own SDPA function unchanged.

It is registered with transformers' ``AttentionInterface`` (its extension
point for attention functions) under ``loralab_sdpa``, with SDPA's mask
builder; the name is not saved with the model's config.
"""

from __future__ import annotations

import torch

from loralab.lora.dropout import dropout as fast_dropout
from loralab.models import quiet_transformers

NAME = "loralab_sdpa"


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; (B, H, T, D) in, (B, T, H, D) out."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if (dropout == 0 or query.device.type != "cpu" or causal
            or getattr(module, "num_key_value_groups", 1) > 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions")):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout,
                     scaling=scaling, is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # (B, H, Tq, Tk)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:  # additive
            scores = scores + attention_mask
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout, True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_fast_attention(model) -> bool:
    """Switch a transformers model that uses SDPA to :func:`attention`; True if
    it did. Models that cannot change attention at run time are left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        with quiet_transformers():  # a model that can't switch only warns
            model.set_attn_implementation(NAME)
    except (ValueError, TypeError, AttributeError):
        return False
    return config._attn_implementation == NAME
