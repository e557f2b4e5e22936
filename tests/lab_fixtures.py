"""Synthetic result rows for the lab's report tests: the metrics.json schema of
``loralab train`` with made-up but self-consistent numbers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

MiB = 2**20


def metrics(method, rank=None, *, task="classify", trainable=0, seconds=10.0, quality=0.9,
            alpha=None, targets="attention", lr=2e-4, forgetting=None, steps=30):
    total = 22_700_000 if task == "classify" else 134_500_000
    weights = total * 4 if method != "qlora" else total * 0.6
    grads = trainable * 4
    curve = [[s, 2.0 * math.exp(-s / (8 + (rank or 4))) + 0.2 + 0.05 * (method == "head")]
             for s in range(1, steps + 1)]
    row = {
        "method": method, "task": task, "model": "minilm", "rank": rank,
        "alpha": alpha if alpha is not None else (2 * rank if rank else None),
        "targets": targets if rank else None, "lr": lr,
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total, "train_seconds": seconds,
        "train_tokens": 120_000, "tokens_per_second": 120_000 / seconds, "steps": steps,
        "epochs": 2,
        "peak_memory": {"device": "cpu", "peak_rss_bytes": int(weights + 3 * grads + 400 * MiB),
                        "tensors": {"weights_bytes": int(weights),
                                    "weights_by_dtype": {"float32": int(weights)},
                                    "gradients_bytes": grads, "optimizer_bytes": 2 * grads,
                                    "total_bytes": int(weights + 3 * grads)}},
        "artifact_bytes": trainable * 4 + 2048 if method != "full" else total * 4,
        "loss_curve": curve,
    }
    if task == "classify":
        row["eval"] = {"accuracy": quality + 0.01, "f1": quality}
        row["test"] = {"accuracy": quality + 0.005, "f1": quality - 0.002}
    else:
        row["eval"] = {"loss": math.log(quality), "perplexity": quality}
        row["test"] = {"loss": math.log(quality), "perplexity": quality}
        if forgetting:
            before, after = forgetting
            row["forgetting"] = {"before_ppl": before, "after_ppl": after,
                                 "delta": after - before,
                                 "percent": 100 * (after - before) / before}
    return row


def row(name, status="ok", error=None, **kw):
    base = metrics(**kw) if status != "failed" else {}
    spec = {k: kw.get(k) for k in ("method", "rank", "alpha", "lr", "targets")}
    return {**base, "run": name, "status": status, "error": error, "run_dir": f"runs/{name}",
            "spec": spec}


def classify_rows():
    return [
        row("full", method="full", trainable=22_700_000, seconds=120.0, quality=0.912),
        row("head", method="head", trainable=1_540, seconds=14.0, quality=0.71),
        row("lora-r8", method="lora", rank=8, trainable=148_000, seconds=41.0, quality=0.908),
        row("qlora-r8", status="failed", method="qlora", rank=8,
            error="RuntimeError: bitsandbytes has no CPU kernel for this operation"),
    ]


def sweep_rows():
    rows = [row("full", method="full", trainable=22_700_000, seconds=120.0, quality=0.912),
            row("head", method="head", trainable=1_540, seconds=14.0, quality=0.71)]
    for targets, bump in (("attention", 0.0), ("all-linear", 0.006)):
        for r in (1, 2, 4, 8, 16):
            q = 0.912 - 0.05 / (r + 1) + bump - 0.004
            rows.append(row(f"lora-r{r}-{targets}", method="lora", rank=r, targets=targets,
                            trainable=18_500 * r * (2.5 if bump else 1), seconds=38 + r,
                            quality=q))
    return rows


def sft_rows():
    return [
        row("full", method="full", task="sft", trainable=134_500_000, seconds=300.0,
            quality=8.1, forgetting=(21.0, 29.5)),
        row("lora-r8", method="lora", rank=8, task="sft", trainable=1_800_000, seconds=120.0,
            quality=8.9, forgetting=(21.0, 22.1)),
        row("qlora-r8", method="qlora", rank=8, task="sft", trainable=1_800_000,
            seconds=190.0, quality=9.2, forgetting=(21.6, 22.5)),
    ]


HONEST_CAVEATS = [
    ("the test split has 400 rows: an accuracy near 50% is known to about ±4.9 pt "
     "(95%); smaller differences are noise."),
    "class balance of the training data: ham 700 (58%), spam 500 (42%)."]


def scored(name, method, y, pred, **kw):
    """A row whose test split is what ``loralab train`` writes for ``pred``:
    scores, intervals, baseline, at-chance flag, per-row predictions."""
    from loralab.train.metrics import classification_metrics

    out = row(name, method=method, **kw)
    out["test"] = classification_metrics([int(v) for v in y], [int(v) for v in pred],
                                         ["ham", "spam"], loss=0.5)
    out["eval"] = {}
    out["data"] = {"test_rows": len(y), "caveats": HONEST_CAVEATS}
    return out


def honest_rows():
    """400 test rows: full FT right on 90 %, head-only answering 'spam' to all
    (at chance), LoRA r=8 four rows from full FT (noise), LoRA r=2 right on 80 %."""
    import numpy as np

    truth = np.random.default_rng(0).integers(0, 2, 400)

    def right(share, seed):
        return np.where(np.random.default_rng(seed).random(400) < share, truth, 1 - truth)

    full = right(0.9, 1)
    near = full.copy()
    near[:4] = 1 - near[:4]
    return [scored("full", "full", truth, full, trainable=22_700_000, seconds=120.0),
            scored("head", "head", truth, np.ones_like(truth), trainable=1_540, seconds=14.0),
            scored("lora-r8", "lora", truth, near, rank=8, trainable=148_000, seconds=41.0),
            scored("lora-r2", "lora", truth, right(0.8, 2), rank=2, trainable=37_000,
                   seconds=39.0)]


GENERATIONS = [
    {"prompt": "Give three tips for staying healthy.", "reference": "1. Eat well ...",
     "outputs": {"base": "Staying healthy is <important>.", "full": "1. Eat vegetables.",
                 "lora-r8": "1. Sleep eight hours.", "qlora-r8": "1. Walk daily."}},
]

META = {"title": "loralab compare: minilm on tickets", "model": "minilm", "task": "classify",
        "data": "tickets", "created": "2026-11-24 10:00",
        "command": "loralab compare --model minilm --data tickets",
        "environment": {"CPU": "test CPU (2 cores)", "torch": "2.13.0"},
        "settings": {"epochs": 2, "seed": 0}}


# --- tiny data for end-to-end lab tests (the models: train_support) ---------------

WORDS = ("refund", "invoice", "charge", "payment", "crash", "error", "login", "screen",
         "slow", "billing", "password", "update", "order", "account", "button", "page")


def tiny_classify_csv(path: Path, rows: int = 60) -> Path:
    """Two classes told apart by their words; every text unique."""
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(rows):
        label = ("billing", "bug")[i % 2]
        words = WORDS[:8] if label == "billing" else WORDS[4:12]
        lines.append(" ".join(rng.choice(words) for _ in range(6)) + f" n{i},{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_instructions(path: Path, records: int = 30) -> Path:
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(records):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            fh.write(json.dumps({"instruction": f"add {a} and {b}", "input": "",
                                 "output": f"the sum is {a + b}"}) + "\n")
    return path


def general_text(path: Path) -> Path:
    sentences = ["The river runs past the old mill and into the valley.",
                 "People gather in the square on market days to trade bread and news.",
                 "A cold wind came down from the hills before the first snow."]
    path.write_text(" ".join(sentences * 12) + "\n", encoding="utf-8")
    return path
