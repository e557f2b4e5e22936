"""Carry out a plan: train each run in its own process, one after another,
then aggregate the run dirs into results.json, results.csv and report.html.

Finished runs are kept and skipped on a re-run; a failed run becomes a row
with its error and the others go on; outputs are rewritten after every run,
so an interrupted comparison still shows what it finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from loralab.io import atomic_write_json, atomic_write_text, remove_stale_temps
from loralab.lab import fmt
from loralab.lab import results as R
from loralab.lab.environment import environment
from loralab.lab.outdir import LAB_DIR, is_finished, open_output, save_state
from loralab.lab.plan import LORA_FAMILY, Plan, variant_of
from loralab.lab.report import write_report
from loralab.lab.runner import resumable, run_training, write_run_yaml

SHOWN_SETTINGS = ("model", "data", "eval_data", "test_data", "task", "seed", "epochs",
                  "max_steps", "batch_size", "grad_accum", "max_length", "warmup_ratio",
                  "scheduler", "weight_decay", "dropout", "mixed_precision", "general_text")


def spec_dict(plan: Plan, name: str) -> dict:
    cfg = plan.configs[name]
    lora = cfg.method in LORA_FAMILY
    return {"method": cfg.method, "variant": variant_of(cfg), "rank": cfg.rank if lora else None,
            "alpha": cfg.alpha if lora else None, "lr": cfg.lr,
            "targets": cfg.targets if lora else None}


def load_row(plan: Plan, name: str, status: str) -> dict:
    run_dir = plan.output / name
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {**metrics, "run": name, "status": status, "error": None, "run_dir": str(run_dir),
            "spec": spec_dict(plan, name)}


def failed_row(plan: Plan, name: str, error: str) -> dict:
    cfg = plan.configs[name]
    return {"method": cfg.method, "task": cfg.task, "model": cfg.model, "run": name,
            "status": "failed", "error": error, "run_dir": str(plan.output / name),
            "spec": spec_dict(plan, name)}


def _describe_record(name: str, record: dict | None) -> str:
    if not record:
        return f"[bold]{name}[/]: loading"
    bits = [f"step {record.get('step')}"]
    if fmt.is_number(record.get("epoch")):
        bits.append(f"epoch {record['epoch']:.2f}")
    if fmt.is_number(record.get("loss")):
        bits.append(f"loss {record['loss']:.3f}")
    if fmt.is_number(record.get("tokens_per_second")):
        bits.append(f"{fmt.count(record['tokens_per_second'])} tok/s")
    return f"[bold]{name}[/]: " + " · ".join(bits)


PROGRESS_EVERY_S = 30.0  # a progress line this often when the output is not a terminal


def _follow(name: str, progress: Progress, task_id):
    """``on_poll``: the live description, and, where no live display shows (output
    redirected to a file), one plain line per PROGRESS_EVERY_S with news."""
    last = {"t": time.monotonic(), "record": None}

    def on_poll(record):
        text = _describe_record(name, record)
        progress.update(task_id, description=text)
        now = time.monotonic()
        if (not progress.console.is_terminal and record and record != last["record"]
                and now - last["t"] >= PROGRESS_EVERY_S):
            progress.console.print(text)
            last.update(t=now, record=record)
    return on_poll


def _attempt(plan: Plan, name: str, progress: Progress, task_id, resume: bool):
    run_dir = plan.output / name
    config_yaml = plan.output / LAB_DIR / f"{name}.yaml"
    write_run_yaml(config_yaml, plan.run_config(name), run_dir)
    progress.update(task_id, description=_describe_record(name, None))
    return run_training(config_yaml, run_dir, plan.output / "logs" / f"{name}.log",
                        resume=resume, on_poll=_follow(name, progress, task_id))


def train_one(plan: Plan, state: dict, name: str, progress: Progress, task_id) -> dict:
    """Train one run in a subprocess; record the outcome in the lab state. A run
    interrupted earlier continues from its last checkpoint."""
    fingerprint = plan.run_fingerprint(name)
    record = state["runs"].get(name) or {}
    resume = (record.get("status") == "running" and record.get("fingerprint") == fingerprint
              and resumable(plan.output / name))
    state["runs"][name] = {"status": "running", "fingerprint": fingerprint}
    save_state(plan.output, state)
    if resume:
        progress.console.print(f"resuming {name} from its last checkpoint")
    outcome = _attempt(plan, name, progress, task_id, resume)
    if resume and not outcome.ok:
        progress.console.print(f"[yellow]resuming {name} failed[/] ({outcome.error}); "
                               "training it from the start")
        outcome = _attempt(plan, name, progress, task_id, False)
    state["runs"][name] = {"status": "ok" if outcome.ok else "failed", "error": outcome.error,
                           "fingerprint": fingerprint, "wall_seconds": round(outcome.seconds, 2)}
    save_state(plan.output, state)
    if outcome.ok:
        progress.console.print(f"[green]done[/] {name} in {fmt.seconds(outcome.seconds)}")
        return load_row(plan, name, "ok")
    progress.console.print(f"[red]failed[/] {name}: {outcome.error}")
    return failed_row(plan, name, outcome.error)


def make_progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def report_meta(plan: Plan, env: dict, generations: list[dict]) -> dict:
    shared = plan.shared()
    from loralab.models import model_display_name

    model = model_display_name(shared["model"])
    data = shared["data"] if shared["data"] in ("tickets", "instructions") \
        else Path(shared["data"]).name
    settings = {k: shared[k] for k in SHOWN_SETTINGS if shared.get(k) is not None}
    if plan.task == "sft":
        settings["generations"] = f"{plan.generations} prompts, {plan.max_new_tokens} new tokens"
    return {"title": f"loralab {plan.kind}: {model} on {data}", "model": model,
            "task": plan.task, "data": data, "created": time.strftime("%Y-%m-%d %H:%M"),
            "command": plan.command, "environment": env, "settings": settings,
            "generations": generations, "lr_search": plan.lr_search}


def write_outputs(plan: Plan, rows: list[dict], env: dict, generations: list[dict]) -> None:
    """results.json, results.csv, generations.jsonl and report.html, each atomic."""
    meta = report_meta(plan, env, generations)
    atomic_write_json(plan.output / "results.json", {
        "kind": plan.kind, "fingerprint": plan.fingerprint(), "command": plan.command,
        "created": meta["created"], "environment": env, "settings": plan.shared(),
        "runs": rows, "generations": generations, "lr_search": plan.lr_search or None})
    atomic_write_text(plan.output / "results.csv", R.to_csv(rows))
    if generations:
        atomic_write_text(plan.output / "generations.jsonl",
                          "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
    write_report(plan.output / "report.html", rows, meta)


def preflight(plan: Plan) -> None:
    """Before any run starts: the data reads (a missing file is one error line,
    not a failed row in a report), the output is writable and its disk holds every
    run's artifacts plus the largest run's checkpoints."""
    from loralab.data.dataset import prepare_data
    from loralab.io import check_free_space, check_writable
    from loralab.train.preflight import disk_plan

    first = plan.configs[plan.runs[0].name]
    prep = prepare_data(first)
    check_writable(plan.output)
    labels = len(prep.label_map.labels) if prep.label_map else 2
    disks = [disk_plan(plan.configs[spec.name], labels) for spec in plan.runs]
    if all(d is not None for d in disks):
        need = sum(d.artifact for d in disks) + max(d.transient() for d in disks)
        check_free_space(plan.output, need, f"{len(disks)} runs' artifacts and checkpoints")


def execute(plan: Plan, *, overwrite: bool = False, console: Console | None = None) -> list[dict]:
    """Run every unfinished run of ``plan``; return one row per run, in plan order."""
    console = console or Console()
    preflight(plan)
    state = open_output(plan, overwrite)
    remove_stale_temps(plan.output, depth=2)  # what killed runs left (a loralab dir now)
    env = environment()
    names = [spec.name for spec in plan.runs]
    shared = plan.shared()
    console.print(f"{plan.kind}: {', '.join(names)} · model {shared['model']} · data "
                  f"{shared['data']} ({plan.task}) · output {plan.output}")
    rows = {n: load_row(plan, n, "skipped") for n in names if is_finished(plan, state, n)}
    if rows:
        console.print(f"kept {len(rows)} finished run(s) from {plan.output}: {', '.join(rows)}")
    ordered = lambda: [rows[n] for n in names if n in rows]
    with make_progress(console) as progress:
        overall = progress.add_task(f"{plan.kind} ({plan.output})", total=len(names),
                                    completed=len(rows))
        current = progress.add_task("", total=None)
        for name in names:
            if name not in rows:
                rows[name] = train_one(plan, state, name, progress, current)
                progress.advance(overall)
                write_outputs(plan, ordered(), env, [])
        generations = []
        if plan.task == "sft" and plan.generations > 0:
            progress.update(current, description="[bold]generations[/]: side by side")
            from loralab.lab.side_by_side import side_by_side

            generations = side_by_side(plan, ordered(), progress.console)
        progress.update(current, visible=False)
    write_outputs(plan, ordered(), env, generations)
    return ordered()
