"""Merge a saved adapter into its base and write a plain HF model dir.

Works on adapters saved by loralab or by peft. A QLoRA adapter is merged into
the *dequantized* NF4 base: it was trained against those weights, not the
original floats, so merging into the originals would shift every output by
the quantization error the adapter had learned to compensate.
"""

from __future__ import annotations

import torch

CHECK_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "My invoice shows a charge I do not recognise.",
    "Explain what a low-rank adapter is in one sentence.",
]


def load_with_adapter(adapter_dir, base: str | None = None):
    """``(model, tokenizer, info)``: the base with the adapter on top, quantized
    first when the adapter was trained with QLoRA (the one loader)."""
    from loralab.lora.adapters import load_base_and_adapter

    return load_base_and_adapter(adapter_dir, base)


@torch.inference_mode()
def _check_logits(model, tok) -> torch.Tensor:
    batch = tok(CHECK_TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=64)
    return model(**batch).logits.float()


def merged_model(adapter_dir, base: str | None = None):
    """``(merged model, tokenizer, info)``: the adapter folded into its base,
    checked: ``info["max_abs_diff"]`` is the largest logit change on
    CHECK_TEXTS between the adapter and the merged model."""
    from loralab.lora import merge_and_unload

    model, tok, info = load_with_adapter(adapter_dir, base)
    before = _check_logits(model, tok)
    merged = merge_and_unload(model)
    after = _check_logits(merged, tok)
    info["max_abs_diff"] = float((after - before).abs().max())
    info["check_inputs"] = len(CHECK_TEXTS)
    return merged.eval(), tok, info


def merge_adapter(adapter_dir, output, base: str | None = None) -> dict:
    """Merge and write ``output`` atomically; returns what was checked."""
    from loralab.io import atomic_dir

    merged, tok, info = merged_model(adapter_dir, base)
    with atomic_dir(output) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    info["output"] = str(output)
    return info
