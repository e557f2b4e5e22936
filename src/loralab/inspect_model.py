"""Look at a model's linear layers without loading weights (meta device)."""

from __future__ import annotations

import re
from collections import OrderedDict

from loralab.errors import LoralabError


def linear_groups(model) -> list[dict]:
    """Linear layers grouped by name with layer indices replaced by '*', each
    with the presets that select it."""
    from loralab.lora import PRESETS, find_targets
    from loralab.lora.base import base_shape, is_linear

    selected = {}
    for preset in PRESETS:
        try:
            selected[preset] = set(find_targets(model, preset))
        except LoralabError:
            selected[preset] = set()
    groups: OrderedDict[str, dict] = OrderedDict()
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        key = re.sub(r"\.\d+\.", ".*.", name)
        d_in, d_out = base_shape(module)
        g = groups.setdefault(key, {"name": key, "d_in": d_in, "d_out": d_out, "count": 0,
                                    "type": type(module).__name__,
                                    "presets": [p for p in PRESETS if name in selected[p]]})
        g["count"] += 1
    return list(groups.values())


def preset_counts(model, rank: int) -> list[dict]:
    """LoRA parameters per preset at ``rank``: layers, params, % of the model."""
    from loralab.lora import PRESETS, find_targets, lora_shapes

    total = sum(p.numel() for p in model.parameters())
    rows = []
    for preset in PRESETS:
        try:
            names = find_targets(model, preset)
        except LoralabError:
            rows.append({"preset": preset, "layers": 0, "params": None, "percent": None})
            continue
        params = sum(rank * (d_in + d_out) for _, d_in, d_out in lora_shapes(model, names))
        rows.append({"preset": preset, "layers": len(names), "params": params,
                     "percent": 100.0 * params / total})
    return rows
