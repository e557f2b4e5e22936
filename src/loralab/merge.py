"""Merge a saved adapter into its base and write a plain HF model dir.

Works on adapters saved by loralab or by peft. A QLoRA adapter is merged into
the *dequantized* NF4 base: it was trained against those weights, not the
original floats, so merging into the originals would shift every output by
the quantization error the adapter had learned to compensate.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loralab.errors import LoralabError

TASKS = {"SEQ_CLS": "classify", "CAUSAL_LM": "sft"}
CHECK_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "My invoice shows a charge I do not recognise.",
    "Explain what a low-rank adapter is in one sentence.",
]


def _labels(adapter_dir: Path, weights_head_rows: int | None) -> dict | None:
    for candidate in (adapter_dir / "labels.json", adapter_dir.parent / "labels.json"):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            id2label = data.get("id2label", data) if isinstance(data, dict) else data
            if isinstance(id2label, list):
                id2label = dict(enumerate(id2label))
            return {int(k): str(v) for k, v in id2label.items()}
    if weights_head_rows:
        return {i: f"LABEL_{i}" for i in range(weights_head_rows)}
    return None


def _head_rows(adapter_dir: Path, heads: list[str]) -> int | None:
    """Label count from the saved head: rows of its last weight matrix."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if k.endswith("weight")  # noqa: SIM118
                and any(f".{h}." in k for h in heads)]
        return f.get_slice(keys[-1]).get_shape()[0] if keys else None


def load_with_adapter(adapter_dir, base: str | None = None):
    """``(model, tokenizer, info)``: the base with the adapter loaded on top,
    quantized first when the adapter was trained with QLoRA."""
    from loralab.lora import load_adapter, read_adapter_config
    from loralab.models import load_model

    config = read_adapter_config(adapter_dir)
    adapter_dir = Path(config["_dir"])
    meta = config["_loralab"]
    base = base or meta.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise LoralabError(f"adapter '{adapter_dir}' does not say which base model it is for.",
                           hint="Fix: pass --base MODEL.")
    task = meta.get("task") or TASKS.get(config.get("task_type"), "sft")
    id2label = None
    if task == "classify":
        id2label = _labels(adapter_dir, _head_rows(adapter_dir,
                                                   config.get("modules_to_save") or []))
    quantized = bool(meta.get("quantized"))
    model, tok = load_model(base, task, id2label=id2label, quantize_4bit=quantized)
    load_adapter(model, adapter_dir)
    model.eval()
    return model, tok, {"base": base, "task": task, "quantized": quantized,
                        "adapter_dir": str(adapter_dir)}


@torch.inference_mode()
def _check_logits(model, tok) -> torch.Tensor:
    batch = tok(CHECK_TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=64)
    return model(**batch).logits.float()


def merge_adapter(adapter_dir, output, base: str | None = None) -> dict:
    """Merge and write ``output`` atomically; returns what was checked."""
    from loralab.io import atomic_dir
    from loralab.lora import merge_and_unload

    model, tok, info = load_with_adapter(adapter_dir, base)
    before = _check_logits(model, tok)
    merged = merge_and_unload(model)
    after = _check_logits(merged, tok)
    info["max_abs_diff"] = float((after - before).abs().max())
    info["check_inputs"] = len(CHECK_TEXTS)
    with atomic_dir(output) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    info["output"] = str(output)
    return info
