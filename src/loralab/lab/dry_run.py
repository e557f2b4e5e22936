"""``compare --dry-run`` / ``sweep --dry-run``: the plan, printed before
anything trains: each run's settings, its optimizer steps (from the data's row
count, as the training loop counts them), its estimated peak memory
(``loralab estimate``'s analytical model) and its expected training time;
nothing is written to the output directory.

The time is measured, not assumed: a speed from FLOPs would need this
machine's efficiency on this model, which no constant gives (the same model
runs at very different shares of peak on a CPU and a GPU, and LoRA's thin
matrices at a lower share than full fine-tuning's). So each distinct training
shape (method, variant, rank, targets, batch, length) trains PROBE_STEPS steps
in its own process, as the comparison will, in a temporary directory; the
loop's own forecast (the first step pays one-off costs, the next ones give the
rate) turns into the run's time as one-off cost + rate x steps. Evaluation,
saving and generation samples come on top.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

from loralab.errors import LoralabError
from loralab.lab import fmt


def optimizer_steps(cfg, train_rows: int) -> int:
    """The loop's count: micro-batches per epoch, grouped by grad_accum, times
    the epochs (or max_steps); one process."""
    per_epoch = math.ceil(math.ceil(train_rows / cfg.batch_size) / cfg.grad_accum)
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


def _data_facts(cfg) -> dict:
    from loralab.data.dataset import prepare_data

    prep = prepare_data(cfg)
    labels = len(prep.label_map.labels) if prep.label_map else 2
    return {"train_rows": prep.info.get("train_rows") or 0, "labels": labels}


def _peak_estimate(cfg, labels: int, device: str) -> int | None:
    from loralab.estimate.report import build_report

    try:
        report = build_report(cfg.model, cfg.method, task=cfg.task, num_labels=labels,
                              batch_size=cfg.batch_size, seq_len=cfg.max_length,
                              rank=cfg.rank or 8, targets=cfg.targets, device=device,
                              micro_batch_tokens=getattr(cfg, "micro_batch_tokens", None),
                              target_parameters=getattr(cfg, "target_parameters", None),
                              use_dora=getattr(cfg, "use_dora", False),
                              lora_dropout=getattr(cfg, "dropout", 0.0))
    except LoralabError:
        return None  # a model the estimator cannot read: the plan still prints
    return report["estimates"][0]["bytes"]["total"]


def _shape(cfg) -> tuple:
    """What a step's time and memory depend on (not the seed, the rate or the epochs)."""
    from loralab.lab.plan import variant_of

    return (cfg.method, variant_of(cfg), cfg.rank, str(cfg.targets), cfg.batch_size,
            cfg.grad_accum, cfg.max_length, cfg.micro_batch_tokens, cfg.dropout,
            cfg.gradient_checkpointing)


def probe_config(plan, name: str) -> dict:
    """The run's own config, cut to PROBE_STEPS steps, with nothing extra to score."""
    return {**plan.run_config(name), "max_steps": probe_steps(), "general_text": None,
            "save_checkpoints": False, "eval_every": None}


def probe_steps() -> int:
    from loralab.train.loop import Loop

    return Loop.FORECAST_STEPS + 1  # the forecast fires on the step before the last


def time_steps(plan, name: str, workdir: Path) -> dict:
    """Train ``name``'s shape for a few steps in its own process: its seconds
    per step, one-off seconds, and steps per epoch (as the loop counts them)."""
    from loralab.lab.runner import run_training, write_run_yaml

    run_dir, config_yaml = workdir / name, workdir / f"{name}.yaml"
    write_run_yaml(config_yaml, probe_config(plan, name), run_dir)
    outcome = run_training(config_yaml, run_dir, workdir / f"{name}.log")
    if not outcome.ok:
        return {"error": outcome.error}
    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    rate, one_off = m.get("seconds_per_step"), m.get("one_off_seconds")
    if rate is None or one_off is None:
        return {"error": "the probe ended before its rate was timed"}
    steps = m.get("steps") or probe_steps()
    return {"rate": rate, "one_off": one_off,
            "steps_per_epoch": steps / m["epochs"] if m.get("epochs") else None}


def run_steps(cfg, facts: dict, timing: dict | None) -> int | None:
    if cfg.task != "lm":
        return optimizer_steps(cfg, facts["train_rows"])
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = (timing or {}).get("steps_per_epoch")  # lm: blocks, counted by the probe
    return max(1, math.ceil(cfg.epochs * per_epoch)) if per_epoch else None


def expected_seconds(timing: dict | None, steps: int | None) -> float | None:
    if not timing or "rate" not in timing or steps is None:
        return None
    return timing["one_off"] + timing["rate"] * steps


def _search_seconds(plan, cfg, facts, timing) -> float | None:
    """A --tune-lr search: one run per factor, each a fraction of the steps."""
    from loralab.lab.lr_search import budget

    settings = plan.lab.get("tune_lr")
    if not settings:
        return 0.0
    short = dataclasses.replace(cfg, **budget(cfg, settings["fraction"]))
    one = expected_seconds(timing, run_steps(short, facts, timing))
    return None if one is None else one * len(settings["factors"])


def plan_rows(plan, echo=None) -> list[dict]:
    """One row per run: name, method, rank, lr, seed, steps, estimated peak,
    expected training time (a few steps of each training shape measured)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    facts, peaks, timings, out = None, {}, {}, []
    shapes = {_shape(plan.configs[r.name]) for r in plan.runs}
    with tempfile.TemporaryDirectory(prefix="loralab-dry-run-") as tmp:
        for run in plan.runs:
            cfg = plan.configs[run.name]
            facts = facts or _data_facts(cfg)  # the same data and split sizes for every run
            shape = _shape(cfg)
            if shape not in peaks:
                peaks[shape] = _peak_estimate(cfg, facts["labels"], device)
            if shape not in timings:
                if echo:
                    echo(f"timing {probe_steps()} steps of {run.name} "
                         f"({len(timings) + 1} of {len(shapes)} training shapes)...")
                timings[shape] = time_steps(plan, run.name, Path(tmp))
            timing = timings[shape]
            steps = run_steps(cfg, facts, timing)
            rank = cfg.rank if cfg.method in ("lora", "qlora") else None
            out.append({"run": run.name, "method": cfg.method, "rank": rank, "lr": cfg.lr,
                        "seed": cfg.seed, "steps": steps, "peak_bytes": peaks[shape],
                        "expected_seconds": expected_seconds(timing, steps),
                        "search_seconds": _search_seconds(plan, cfg, facts, timing),
                        "timing_error": timing.get("error")})
    return out


def _total(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows]
    return None if any(v is None for v in values) else sum(values)


def print_plan(plan, console=None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = plan_rows(plan, echo=console.print)
    table = Table(title=f"loralab {plan.kind} --dry-run: {len(rows)} runs, nothing trained")
    for name in ("run", "method", "rank", "lr", "seed", "steps", "est. peak memory",
                 "expected time"):
        table.add_column(name, justify="left" if name in ("run", "method") else "right")
    for r in rows:
        table.add_row(r["run"], r["method"], str(r["rank"] or "—"), f"{r['lr']:g}",
                      str(r["seed"]), "—" if r["steps"] is None else str(r["steps"]),
                      fmt.nbytes(r["peak_bytes"]),
                      fmt.seconds(r["expected_seconds"]))
    console.print(table)
    for r in rows:
        if r["timing_error"]:
            console.print(f"{r['run']}: not timed ({r['timing_error']})")
    train, search = _total(rows, "expected_seconds"), _total(rows, "search_seconds")
    if train is not None:
        line = f"expected training time: {fmt.seconds(train)} for {len(rows)} runs"
        if plan.lab.get("tune_lr") and search is not None:
            line += f", plus {fmt.seconds(search)} for the --tune-lr search"
        console.print(line + f" (timed over {probe_steps()} steps of each training shape on "
                      "this machine; evaluation, saving and samples come on top).")
    console.print(f"output: {plan.output}\ncommand: {plan.command}")
    return rows
