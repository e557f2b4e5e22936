"""Two variants of loralab's LoRA training step, A/B'd inside one process.

Between processes the same job's step time moves by up to ±15 % on this VM,
more than the changes worth measuring. So here one ``loralab train`` runs
and every optimizer step's micro-batches are trained twice, once per variant,
the order alternating step by step; the figure is the median of the per-step
time ratios (variant A / variant B) from the second step on, with their
quartiles. Each step is a real optimizer step, so the weights move twice as
often as in a plain run: the timings are what matters, not the model.

Variants (A against B):

- ``base-inside``: a frozen plain base's product computed inside the
  adapter's autograd function, against the adapter added to what the base
  layer returns (``LoRALinear._frozen_base_t`` switched off);
- ``adapter-dropout``: the adapters' dropout as configured against p = 0
  (what the dropout itself costs).

Settings: ``recipe`` and ``demo`` (minilm, bench/lora_vs_full_step.py) and
``sft`` (smollm2-135m on Alpaca, bench/train_sft_tokens.py).

    .venv/bin/python bench/step_ab.py --variant base-inside --setting recipe --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import load_average, machine


def base_inside(on: bool, model) -> None:
    from loralab.lora.layer import LoRALinear

    for module in model.modules():
        if isinstance(module, LoRALinear):
            if on:  # the class's own check again
                module.__dict__.pop("_frozen_base_t", None)
            else:
                module._frozen_base_t = lambda: None


def adapter_dropout(on: bool, model) -> None:
    from loralab.lora.layer import LoRALinear

    for module in model.modules():
        if isinstance(module, LoRALinear):
            for drop in module.lora_dropout.values():
                if hasattr(drop, "p"):
                    drop.configured_p = getattr(drop, "configured_p", drop.p)
                    drop.p = drop.configured_p if on else 0.0


VARIANTS = {"base-inside": base_inside, "adapter-dropout": adapter_dropout}


def options(setting: str, steps: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="loralab-ab-"))
    if setting == "sft":
        from train_sft_tokens import sft_options

        opts = sft_options(tmp, 4, 200)
    else:
        from lora_vs_full_step import LR, SETTINGS

        opts = {**SETTINGS[setting], "method": "lora"}
        if setting in LR:
            opts["lr"] = LR[setting]["lora"]
    return {**opts, "max_steps": steps, "quiet": True, "keep_best": False,
            "save_checkpoints": False, "output": str(tmp / "run")}


def run(variant: str, setting: str, steps: int) -> dict:
    from loralab.config import build_config
    from loralab.train import loop as loop_mod
    from loralab.train import run_training

    switch = VARIANTS[variant]
    original = loop_mod.Loop.train_step
    times: dict[bool, list[float]] = {True: [], False: []}
    count = {"steps": 0}

    def paired(self, micro):
        count["steps"] += 1
        order = (True, False) if count["steps"] % 2 else (False, True)
        out = None
        for on in order:
            switch(on, self.model)
            t = time.perf_counter()
            out = original(self, micro)
            if count["steps"] > 1:  # the first step pays one-off costs
                times[on].append(time.perf_counter() - t)
        return out

    loop_mod.Loop.train_step = paired
    try:
        run_training(build_config(None, None, options(setting, steps)))
    finally:
        loop_mod.Loop.train_step = original
    ratios = [a / b for a, b in zip(times[True], times[False])]
    q = statistics.quantiles(ratios, n=4)
    return {"variant": variant, "setting": setting, "paired_steps": len(ratios),
            "ratio_median": round(statistics.median(ratios), 4),
            "ratio_quartiles": [round(q[0], 4), round(q[2], 4)],
            "a_ms_median": round(1000 * statistics.median(times[True]), 1),
            "b_ms_median": round(1000 * statistics.median(times[False]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="base-inside")
    ap.add_argument("--setting", choices=["recipe", "demo", "sft"], default="recipe")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    head = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "load_average_before": load_average()}
    result = run(args.variant, args.setting, args.steps)
    result["load_average_after"] = load_average()
    print(json.dumps({**head, **result}))


if __name__ == "__main__":
    main()
