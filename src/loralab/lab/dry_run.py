"""``compare --dry-run`` / ``sweep --dry-run``: the plan, printed before
anything trains: each run's settings, its optimizer steps (from the data's row
count, as the training loop counts them) and its estimated peak memory
(``loralab estimate``'s analytical model); nothing is written.

Time is not forecast here: it needs the speed of this machine on this model,
which ``loralab train`` measures over its first steps and prints then
(metrics.json ``expected_train_seconds``).
"""

from __future__ import annotations

import math

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
                              target_parameters=getattr(cfg, "target_parameters", None))
    except LoralabError:
        return None  # a model the estimator cannot read: the plan still prints
    return report["estimates"][0]["bytes"]["total"]


def plan_rows(plan) -> list[dict]:
    """One row per run: name, method, rank, lr, seed, steps, estimated peak."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    facts, peaks, out = None, {}, []
    for run in plan.runs:
        cfg = plan.configs[run.name]
        facts = facts or _data_facts(cfg)  # the same data and split sizes for every run
        lm = cfg.task == "lm"  # documents are packed into blocks: rows are not examples
        key = (cfg.method, cfg.rank, str(cfg.targets), cfg.batch_size, cfg.max_length)
        if key not in peaks:
            peaks[key] = _peak_estimate(cfg, facts["labels"], device)
        rank = cfg.rank if cfg.method in ("lora", "qlora") else None
        out.append({"run": run.name, "method": cfg.method, "rank": rank, "lr": cfg.lr,
                    "seed": cfg.seed,
                    "steps": None if lm else optimizer_steps(cfg, facts["train_rows"]),
                    "peak_bytes": peaks[key]})
    return out


def print_plan(plan, console=None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    rows = plan_rows(plan)
    table = Table(title=f"loralab {plan.kind} --dry-run: {len(rows)} runs, nothing trained")
    for name in ("run", "method", "rank", "lr", "seed", "steps", "est. peak memory"):
        table.add_column(name, justify="left" if name in ("run", "method") else "right")
    for r in rows:
        table.add_row(r["run"], r["method"], str(r["rank"] or "—"), f"{r['lr']:g}",
                      str(r["seed"]), "—" if r["steps"] is None else str(r["steps"]),
                      fmt.nbytes(r["peak_bytes"]))
    console = console or Console()
    console.print(table)
    if plan.lab.get("tune_lr"):
        console.print("--tune-lr: each run's learning-rate search runs first (a fraction of "
                      "its steps per candidate rate).")
    console.print(f"output: {plan.output}\ncommand: {plan.command}\ntime: each run prints its "
                  "expected training time after its first steps (not forecast here).")
    return rows
