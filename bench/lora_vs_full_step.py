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
the ratio is the median of the pairs' LoRA / full ratios. Each run also
reports where its steps' time goes (forward, backward, optimizer step; ms per
step), to show which phase a ratio is lost in.

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


def phase_timer() -> dict:
    """Time each optimizer step's phases inside ``run_training``: the forward
    (``Loop.loss_sum``), the backward (the accelerator's ``backward``) and the
    optimizer's ``step``, summed from the second step on (the first pays
    one-off costs); ``train_step`` is the whole step. Patches ``Loop`` for the
    rest of the process (each job runs in its own)."""
    from loralab.train import loop as loop_mod

    sums = {"train_step": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "steps": 0}
    step, loss_sum = loop_mod.Loop.train_step, loop_mod.Loop.loss_sum

    def timed(name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if sums["steps"] >= 1:
                sums[name] += time.perf_counter() - t
            return out
        return call

    def train_step(self, micro):
        if not getattr(self, "_phases_timed", False):
            self._phases_timed = True
            self.acc.backward = timed("backward", self.acc.backward)
            self.optimizer.step = timed("optimizer", self.optimizer.step)
        out = timed("train_step", step)(self, micro)
        sums["steps"] += 1
        return out

    loop_mod.Loop.train_step = train_step
    loop_mod.Loop.loss_sum = timed("forward", loss_sum)
    return sums


def job(setting: str, method: str, steps: int) -> dict:
    from loralab.config import build_config
    from loralab.train import run_training

    out = Path(tempfile.mkdtemp(prefix="loralab-step-")) / "run"
    options = {**SETTINGS[setting], "method": method, "max_steps": steps, "quiet": True,
               "keep_best": False, "save_checkpoints": False, "output": str(out)}
    if setting in LR:
        options["lr"] = LR[setting][method]
    phases = phase_timer()
    run_dir = run_training(build_config(None, None, options))
    m = json.loads((run_dir / "metrics.json").read_text())
    timed = max(phases.pop("steps") - 1, 1)
    return {"setting": setting, "method": method, "steps": m["steps"],
            "train_seconds": m["train_seconds"],
            "seconds_per_step": m["train_seconds"] / m["steps"],
            # the loop's steady rate (steps 2-4, after the first step's one-off costs)
            "steady_seconds_per_step": m.get("seconds_per_step"),
            "micro_batches_per_step": m.get("micro_batches_per_step"),
            "trainable_params": m.get("trainable_params"),
            # where a step's time goes, ms per step over steps 2 on
            "phase_ms_per_step": {k: round(1000 * v / timed, 1) for k, v in phases.items()}}


def side(setting: str, method: str, steps: int) -> dict:
    before = load_average()
    result = run_job([sys.executable, __file__, "--job", setting, method,
                      "--steps", str(steps)]).check().last_json()
    result["load_average"] = [before, load_average()]
    return result


def phase_line(result: dict) -> str:
    ph = result["phase_ms_per_step"]
    return f"{ph['forward']:.0f}/{ph['backward']:.0f}/{ph['optimizer']:.0f}"


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
                  f"(ms forward/backward/optimizer: lora {phase_line(pair['lora'])}, "
                  f"full {phase_line(pair['full'])}) "
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
