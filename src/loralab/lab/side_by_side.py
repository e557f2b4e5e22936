"""Orchestrate side-by-side generations: which models still need answers, one
worker process to produce them, and the per-prompt table for the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from loralab.io import atomic_write_json
from loralab.lab.outdir import LAB_DIR
from loralab.lab.plan import Plan, digest
from loralab.lab.runner import error_line


def _entries(plan: Plan, rows: list[dict], prompts_key: str) -> list[dict]:
    first = plan.configs[plan.runs[0].name]
    out_dir = plan.output / LAB_DIR / "generations"
    entries = [{"name": "base", "model": first.model, "method": None,
                "key": digest([prompts_key, first.model])}]
    for row in rows:
        if row.get("status") in ("ok", "skipped"):
            name = row["run"]
            entries.append({"name": name, "model": plan.configs[name].model,
                            "method": plan.configs[name].method, "run_dir": row["run_dir"],
                            "config": plan.run_config(name),
                            "key": digest([prompts_key, plan.run_fingerprint(name)])})
    for entry in entries:
        entry["out"] = str(out_dir / f"{entry['name']}.json")
    return entries


def _cached(entry: dict) -> list[str] | None:
    try:
        saved = json.loads(Path(entry["out"]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return saved.get("answers") if saved.get("key") == entry["key"] else None


def _run_worker(plan: Plan, job: dict) -> str | None:
    """Generate in a separate process; the error line if it failed."""
    job_path = plan.output / LAB_DIR / "generations" / "job.json"
    atomic_write_json(job_path, job)
    log = plan.output / "logs" / "generations.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run([sys.executable, "-m", "loralab.lab.worker", str(job_path)],
                              stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode == 0:
        return None
    return error_line(log.read_text(encoding="utf-8", errors="replace"), proc.returncode)


def side_by_side(plan: Plan, rows: list[dict], console: Console) -> list[dict]:
    """One dict per held-out prompt: prompt, reference and every model's answer."""
    from loralab.lab.generations import held_out_prompts

    prompts = held_out_prompts(plan.configs[plan.runs[0].name], plan.generations)
    if not prompts:
        console.print("[yellow]no held-out records: generations skipped[/]")
        return []
    prompts_key = digest([prompts, plan.max_new_tokens])
    entries = _entries(plan, rows, prompts_key)
    todo = [e for e in entries if _cached(e) is None]
    error = None
    if todo:
        error = _run_worker(plan, {"kind": "generate", "prompts": prompts,
                                   "max_new_tokens": plan.max_new_tokens, "models": todo})
        if error:
            console.print(f"[red]generations failed[/]: {error}")
    table = []
    for i, prompt in enumerate(prompts):
        outputs = {}
        for entry in entries:
            answers = _cached(entry)
            outputs[entry["name"]] = answers[i] if answers else f"(not generated: {error})"
        table.append({"prompt": prompt["prompt"], "reference": prompt["reference"],
                      "outputs": outputs})
    return table
