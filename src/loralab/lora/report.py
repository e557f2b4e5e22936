"""Parameter report: trainable / total / %, counted as peft's
``print_trainable_parameters`` counts, plus a per-module-type LoRA table."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from loralab.lora.layer import LoRALinear


def param_count(param) -> int:
    """Elements a parameter stands for; packed 4-bit weights hold 2 per byte
    (peft counts them the same way)."""
    n = param.numel()
    if type(param).__name__ == "Params4bit":
        storage = getattr(param, "quant_storage", None)
        n *= 2 * (storage.itemsize if storage is not None else 1)
    return n


def trainable_report(model: nn.Module) -> dict:
    """``{trainable, total, percent, rows}``; rows group LoRA layers by module
    type with r*(d_in + d_out) parameters per layer."""
    trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(param_count(p) for p in model.parameters())
    groups: OrderedDict[str, dict] = OrderedDict()
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        for r in module.r.values():
            key = name.split(".")[-1]
            row = groups.setdefault(key, {"module": key, "d_in": module.in_features,
                                          "d_out": module.out_features, "r": r,
                                          "layers": 0, "params": 0})
            row["layers"] += 1
            row["params"] += r * (module.in_features + module.out_features)
    rows = list(groups.values())
    for row in rows:
        row["per_layer"] = row["r"] * (row["d_in"] + row["d_out"])
    return {"trainable": trainable, "total": total,
            "percent": 100.0 * trainable / total if total else 0.0, "rows": rows}


def format_trainable(report: dict) -> str:
    """peft's one-line format."""
    return (f"trainable params: {report['trainable']:,} || all params: {report['total']:,} "
            f"|| trainable%: {report['percent']:.4f}")
