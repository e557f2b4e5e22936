"""LoRA's optimizer step against full fine-tuning's, in loralab, on two settings.

- demo: what ``loralab compare`` runs with no arguments (minilm on the built-in
  support tickets; LoRA r=8 on the attention projections, no dropout; the
  default batch and length);
- recipe: the tutorial recipe's settings (bench/train_vs_recipe.py): SMS
  messages, batch 4 x grad-accum 4, max length 128, LoRA r=16 alpha=32 with
  dropout 0.1 on query,key,value,dense (37 layers).

Each run trains ``--steps`` optimizer steps (no epoch ends, so no evaluation
inside the timed loop) in its own process; seconds per step = train seconds /
steps. The methods alternate within a pair, the order flipping each pair, and
the ratio is the median of the pairs' LoRA / full ratios.

    .venv/bin/python bench/lora_vs_full_step.py --pairs 3 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import DATASETS, load_average, machine, run_job

SMS = DATASETS / "sms_spam" / "bench"
SETTINGS = {
    "demo": {"model": "minilm", "data": "tickets"},
    "recipe": {"model": "minilm", "data": str(SMS / "train.tsv"),
               "eval_data": str(SMS / "val.tsv"), "test_data": str(SMS / "test.tsv"),
               "rank": 16, "alpha": 32, "dropout": 0.1, "targets": "query,key,value,dense",
               "batch_size": 4, "grad_accum": 4, "max_length": 128, "weight_decay": 0.01,
               "warmup_ratio": 0.0},
}
LR = {"recipe": {"lora": 3e-4, "full": 3e-5}}


def job(setting: str, method: str, steps: int) -> dict:
    from loralab.config import build_config
    from loralab.train import run_training

    out = Path(tempfile.mkdtemp(prefix="loralab-step-")) / "run"
    options = {**SETTINGS[setting], "method": method, "max_steps": steps, "quiet": True,
               "keep_best": False, "save_checkpoints": False, "output": str(out)}
    if setting in LR:
        options["lr"] = LR[setting][method]
    run_dir = run_training(build_config(None, None, options))
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"setting": setting, "method": method, "steps": m["steps"],
            "train_seconds": m["train_seconds"],
            "seconds_per_step": m["train_seconds"] / m["steps"],
            # the loop's steady rate (steps 2-4, after the first step's one-off costs)
            "steady_seconds_per_step": m.get("seconds_per_step"),
            "micro_batches_per_step": m.get("micro_batches_per_step"),
            "trainable_params": m.get("trainable_params")}


def side(setting: str, method: str, steps: int) -> dict:
    before = load_average()
    result = run_job([sys.executable, __file__, "--job", setting, method,
                      "--steps", str(steps)]).check().last_json()
    result["load_average"] = [before, load_average()]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="demo,recipe")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--job", nargs=2, metavar=("SETTING", "METHOD"))
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.job:
        print(json.dumps(job(*args.job, args.steps)))
        return
    if "recipe" in args.settings and not SMS.exists():
        sys.exit(f"{SMS} not found: the recipe setting needs ../shared/datasets.")
    head = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "load_average_before": load_average(), "steps": args.steps}
    print(json.dumps(head))
    results = {"head": head, "pairs": {}, "ratio_median": {}}
    for setting in args.settings.split(","):
        ratios = []
        for k in range(args.pairs):
            order = ("lora", "full") if k % 2 == 0 else ("full", "lora")
            pair = {m: side(setting, m, args.steps) for m in order}
            ratio = pair["lora"]["seconds_per_step"] / pair["full"]["seconds_per_step"]
            ratios.append(ratio)
            results["pairs"].setdefault(setting, []).append(pair)
            steady = (pair["lora"]["steady_seconds_per_step"]
                      / pair["full"]["steady_seconds_per_step"])
            print(f"{setting}: lora {pair['lora']['seconds_per_step']:.3f} s/step | full "
                  f"{pair['full']['seconds_per_step']:.3f} s/step | lora/full {ratio:.3f} "
                  f"(steps 2-4 only: {steady:.3f}) "
                  f"(load {pair[order[0]]['load_average']} then "
                  f"{pair[order[1]]['load_average']})", flush=True)
        results["ratio_median"][setting] = statistics.median(ratios)
        print(f"{setting}: median lora/full step time over {args.pairs} pairs: "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
