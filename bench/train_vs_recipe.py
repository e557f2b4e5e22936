"""loralab train vs the tutorial recipe (HF Trainer + peft), side by side.

The recipe: HF ``Trainer`` + peft LoRA r=16, alpha=32, dropout 0.1 on
query,key,value,dense; every text padded to 128 tokens; batch 4 x grad-accum 4;
3 epochs; lr 3e-4 (3e-5 for full fine-tuning); weight decay 0.01; linear decay,
no warmup (Trainer defaults); eval on the val split each epoch. loralab trains
the same model on the same split files with the same hyperparameters.

Each job runs in its own subprocess (its own peak memory), one after another.

    .venv/bin/python bench/train_vs_recipe.py            # lora and full, 3 epochs
    .venv/bin/python bench/train_vs_recipe.py --methods lora --epochs 1
    .venv/bin/python bench/train_vs_recipe.py --methods full --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import DATASETS, dataset, load_average, machine, run_job

DATA = DATASETS / "sms_spam" / "bench"
LR = {"lora": 3e-4, "full": 3e-5}
TARGETS = ["query", "key", "value", "dense"]


def read_split(name: str) -> tuple[list[str], list[str]]:
    with open(DATA / f"{name}.tsv", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[1] for r in rows], [r[0] for r in rows]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the recipe ------------------------------------------------------------

def recipe_job(method: str, epochs: float, seed: int) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from sklearn.metrics import f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from loralab.models import resolve_model

    set_seed(seed)
    path = resolve_model("minilm")
    labels = ["ham", "spam"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=dict(enumerate(labels)),
        label2id={v: i for i, v in enumerate(labels)})
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                 lora_dropout=0.1, target_modules=TARGETS))

    def dataset(split):
        texts, labs = read_split(split)
        enc = tok(texts, padding="max_length", truncation=True, max_length=128)
        return [{"input_ids": torch.tensor(enc["input_ids"][i]),
                 "attention_mask": torch.tensor(enc["attention_mask"][i]),
                 "token_type_ids": torch.tensor(enc["token_type_ids"][i]),
                 "labels": torch.tensor(labels.index(labs[i]))} for i in range(len(texts))]

    train, val, test = dataset("train"), dataset("val"), dataset("test")

    def metrics(p):
        return {"f1": f1_score(p.label_ids, np.argmax(p.predictions, -1))}

    out = tempfile.mkdtemp(prefix="recipe-")
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=4,
        num_train_epochs=epochs, learning_rate=LR[method], weight_decay=0.01,
        eval_strategy="epoch", save_strategy="no", logging_steps=10, seed=seed,
        report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      compute_metrics=metrics)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    result = trainer.evaluate(test)
    return {"train_seconds": train_seconds, "test_f1": result["eval_f1"],
            "peak_rss_bytes": peak_rss()}


# ---- loralab ---------------------------------------------------------------

def loralab_job(method: str, epochs: float, seed: int, batch: int, accum: int) -> dict:
    from loralab.config import build_config
    from loralab.train import run_training

    out = Path(tempfile.mkdtemp(prefix="loralab-")) / "run"
    options = {
        "model": "minilm", "data": str(DATA / "train.tsv"), "eval_data": str(DATA / "val.tsv"),
        "test_data": str(DATA / "test.tsv"), "method": method, "rank": 16, "alpha": 32,
        "dropout": 0.1, "targets": ",".join(TARGETS), "batch_size": batch, "grad_accum": accum,
        "epochs": epochs, "lr": LR[method], "weight_decay": 0.01, "warmup_ratio": 0.0,
        "scheduler": "linear", "max_length": 128, "seed": seed, "keep_best": False,
        "quiet": True, "output": str(out)}
    run_dir = run_training(build_config(None, None, options))
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"train_seconds": m["train_seconds"], "test_f1": m["test"]["f1"],
            "peak_rss_bytes": m["peak_memory"]["peak_rss_bytes"],
            "tokens_per_second": m["tokens_per_second"]}


# ---- driver ----------------------------------------------------------------

def side(kind: str, method: str, epochs: float, seed: int, batch: int, accum: int) -> dict:
    """One side's measurement, in its own process (its own peak memory)."""
    cmd = [sys.executable, __file__, "--job", kind, "--methods", method, "--epochs", str(epochs),
           "--seed", str(seed), "--batch", str(batch), "--accum", str(accum)]
    load_before = load_average()
    job = run_job(cmd).check()
    result = job.last_json()
    result["process_seconds"] = job.seconds
    # the machine is shared: the 1-minute load average shows how busy it was
    result["load_average"] = [load_before, load_average()]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--job", choices=["recipe", "loralab"])
    ap.add_argument("--repeats", type=int, default=1,
                    help="recipe/loralab pairs per method, run back to back (median reported)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.job:  # one measurement, in this subprocess
        fn = recipe_job if args.job == "recipe" else loralab_job
        extra = () if args.job == "recipe" else (args.batch, args.accum)
        print(json.dumps(fn(args.methods, args.epochs, args.seed, *extra)))
        return
    dataset("sms_spam", "bench")
    rows, summary = [], {}
    for method in args.methods.split(","):
        for _ in range(args.repeats):  # pairs back to back: the VM's speed drifts
            recipe = side("recipe", method, args.epochs, args.seed, 4, 4)
            ours = side("loralab", method, args.epochs, args.seed, args.batch, args.accum)
            row = {"method": method, "recipe": recipe, "loralab": ours,
                   "speedup": recipe["train_seconds"] / ours["train_seconds"],
                   "f1_delta_points": 100 * (ours["test_f1"] - recipe["test_f1"])}
            rows.append(row)
            print(f"{method}: recipe {recipe['train_seconds']:.1f} s F1 {recipe['test_f1']:.4f} | "
                  f"loralab {ours['train_seconds']:.1f} s F1 {ours['test_f1']:.4f} | "
                  f"{row['speedup']:.2f}x faster, F1 {row['f1_delta_points']:+.2f} points "
                  f"(load {recipe['load_average']} vs {ours['load_average']})", flush=True)
            ratios = [r["speedup"] for r in rows if r["method"] == method]
            summary[method] = {"pairs": len(ratios), "median_speedup": statistics.median(ratios),
                               "min_speedup": min(ratios), "max_speedup": max(ratios)}
            report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                      "command": " ".join([Path(sys.executable).name] + sys.argv),
                      "summary": summary, "rows": rows}
            if args.json:  # after every pair, so a long run keeps what it measured
                Path(args.json).write_text(json.dumps(report, indent=2))
        if args.repeats > 1:
            m = summary[method]
            print(f"{method}: median {m['median_speedup']:.2f}x over {m['pairs']} pairs "
                  f"({m['min_speedup']:.2f}x to {m['max_speedup']:.2f}x)", flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
