"""Where a training step's time goes: the tutorial recipe's LoRA vs full
fine-tuning, and loralab's dynamic padding, under torch.profiler.

Each configuration trains minilm on SMS messages for a few optimizer steps
(batch 4 x grad-accum 4, as the recipe) and reports milliseconds per optimizer
step and the share of time per kind of operator.

    .venv/bin/python bench/train_profile.py --steps 3

``--engine loralab`` profiles loralab's own training step instead (``loralab
train`` on the recipe's settings, bench/lora_vs_full_step.py; its
``Loop.train_step`` under the profiler after one warm-up step), LoRA and full
fine-tuning, and lists the operators that take the most time in each, so the
two steps can be compared operator by operator.
"""

from __future__ import annotations

import argparse
import csv
import json
import time

import torch
from _common import dataset, load_average, machine

KINDS = {  # operator name fragments -> kind
    "dropout masks": ("bernoulli", "dropout"),
    "matmul": ("mm", "addmm", "bmm", "linear", "matmul"),
    "optimizer": ("adam", "sqrt", "lerp", "addcdiv", "addcmul", "foreach"),
    "attention": ("softmax", "scaled_dot_product"),
}


def texts(n: int) -> list[str]:
    with open(dataset("sms_spam", "bench", "train.tsv"), encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[1] for r in rows[:n]]


def build(method: str, targets: list[str], dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from loralab.models import resolve_model

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"),
                                                               num_labels=2)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                 lora_dropout=dropout, target_modules=targets))
    return model.train()


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS.items():
        if any(k in low for k in keys):
            return kind
    return "other"


def profile(method: str, pad: bool, steps: int, dropout: float = 0.1,
            targets=("query", "key", "value", "dense")) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from loralab.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    model = build(method, list(targets), dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    data = texts(16 * (steps + 1))
    labels = torch.tensor([0, 1, 0, 1])

    def step(k: int) -> None:
        for j in range(4):  # 4 micro-batches of 4, then one optimizer step
            chunk = data[(4 * k + j) * 4:(4 * k + j + 1) * 4]
            enc = tok(chunk, padding="max_length" if pad else True, truncation=True,
                      max_length=128, return_tensors="pt")
            (model(**enc, labels=labels).loss / 4).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(1, steps + 1):
            step(k)
    ms = 1000 * (time.perf_counter() - t0) / steps
    shares: dict[str, float] = {}
    total = 0.0
    for ev in prof.key_averages():
        shares[kind_of(ev.key)] = shares.get(kind_of(ev.key), 0.0) + ev.self_cpu_time_total
        total += ev.self_cpu_time_total
    return {"method": method, "padding": "128" if pad else "dynamic", "dropout": dropout,
            "targets": ",".join(targets) if method == "lora" else "all",
            "ms_per_step": round(ms, 1),
            "share": {k: round(100 * v / total, 1) for k, v in sorted(shares.items())}}


def profile_train_steps(options: dict, steps: int, shapes: bool = False):
    """``loralab train`` with ``options`` for ``steps + 1`` optimizer steps, the
    last ``steps`` of them under torch.profiler (the first is a warm-up).
    Returns the profiler and the wall seconds of the profiled steps."""
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    from loralab.config import build_config
    from loralab.train import loop as loop_mod
    from loralab.train import run_training

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=shapes)
    seen, timed = {"n": 0}, {"t": 0.0}
    original = loop_mod.Loop.train_step

    def step(self, micro):
        seen["n"] += 1
        if seen["n"] == 2:
            prof.start()
        t0 = time.perf_counter()
        out = original(self, micro)
        if seen["n"] >= 2:
            timed["t"] += time.perf_counter() - t0
        if seen["n"] == steps + 1:
            prof.stop()
        return out

    loop_mod.Loop.train_step = step
    try:
        out = Path(tempfile.mkdtemp(prefix="loralab-prof-")) / "run"
        run_training(build_config(None, None, {
            **options, "max_steps": steps + 1, "quiet": True, "save_checkpoints": False,
            "output": str(out)}))
    finally:
        loop_mod.Loop.train_step = original
    return prof, timed["t"]


def profile_loralab(method: str, steps: int, top: int = 12) -> dict:
    """loralab's own step (its model, packing, dropout, loss, optimizer) profiled."""
    from lora_vs_full_step import LR, SETTINGS

    prof, seconds = profile_train_steps({**SETTINGS["recipe"], "method": method,
                                         "lr": LR["recipe"][method], "keep_best": False}, steps)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares: dict[str, float] = {}
    for ev in events:
        shares[kind_of(ev.key)] = shares.get(kind_of(ev.key), 0.0) + ev.self_cpu_time_total
    return {"engine": "loralab", "method": method, "ms_per_step": round(1000 * seconds / steps, 1),
            "share": {k: round(100 * v / total, 1) for k, v in sorted(shares.items())},
            "top": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                     "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 1)}
                    for e in events[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--engine", choices=["recipe", "loralab"], default="recipe")
    args = ap.parse_args()
    if args.engine == "loralab":
        print(json.dumps({"machine": machine(), "load_average_before": load_average(),
                          "date": time.strftime("%Y-%m-%d")}))
        for method in ("lora", "full"):
            print(json.dumps(profile_loralab(method, args.steps)), flush=True)
        return
    print(json.dumps({"machine": machine(), "load_average_before": load_average(),
                      "date": time.strftime("%Y-%m-%d")}))
    runs = [profile("full", True, args.steps), profile("lora", True, args.steps),
            profile("lora", True, args.steps, dropout=0.0),
            profile("lora", True, args.steps, targets=("query", "value")),
            profile("full", False, args.steps), profile("lora", False, args.steps)]
    for r in runs:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
