"""Helpers shared by the comparison lab's validation scripts (bench/validate_*.py):
running `loralab compare` and printing the results as a Markdown table for
BENCHMARKS.md (the datasets path and the job runner: ``_common``)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from _common import loralab_cmd, run_job

from loralab.lab import fmt
from loralab.lab import results as R
from loralab.lab.environment import environment


def run_compare(args: list[str]) -> float:
    """Run `loralab compare` as a user would; return its wall time in seconds."""
    print("$ loralab compare " + " ".join(map(str, args)), flush=True)
    job = run_job(loralab_cmd("compare", *args), capture=False)
    if job.returncode not in (0, 1):  # 1: a run failed, still a result row
        sys.exit(f"loralab compare exited with {job.returncode}")
    return job.seconds


def markdown(rows: list[dict]) -> str:
    """One Markdown row per run: cost and quality, with ratios against full FT."""
    quality, full = R.headline_quality(rows), R.reference_row(rows)
    forgetting = any(r.get("forgetting") for r in rows)
    second = R.secondary_text  # accuracy beside F1, eval loss beside perplexity
    head = ["run", "trainable params", "train time", "tokens/s", "peak RSS", quality.label,
            "vs full FT", "also"] + (["general-text ppl before → after (Δ%)"] if forgetting
                                     else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, label in zip(rows, R.labels(rows)):
        if row.get("status") not in R.HAS_RESULTS:
            lines.append(f"| {label} | failed: {row.get('error')} |" + " |" * (len(head) - 2))
            continue
        vs = R.versus_full(row, full, quality)
        mem = R.memory_breakdown(row) or {}
        cells = [label, f"{row['trainable_params']:,} ({fmt.percent(row['trainable_percent'])})",
                 fmt.seconds(row.get("train_seconds")), fmt.count(row.get("tokens_per_second")),
                 fmt.nbytes(mem.get("peak")),
                 R.quality_text(row, quality) if quality.points
                 else fmt.number(R.metric_value(row, quality.key), 4),
                 "—" if row is full else R.delta_text(vs, quality), second(row, quality)]
        if forgetting:
            f = row.get("forgetting") or {}
            cells.append(f"{fmt.number(f.get('before_ppl'), 4)} → "
                         f"{fmt.number(f.get('after_ppl'), 4)} ({fmt.signed(f.get('percent'), 1)}%)"
                         if f else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(outs: list[Path], wall: float) -> str:
    """Machine, commands, wall time and one table over the rows of every output."""
    datas = [json.loads((out / "results.json").read_text(encoding="utf-8")) for out in outs]
    rows = [row for data in datas for row in data["runs"]]
    env = environment()
    machine = (f"machine: {env['CPU']}, {env['memory']}, GPU {env['GPU']}; "
               f"torch {env['torch']}, transformers {env['transformers']}; "
               f"{platform.system()}; date {time.strftime('%Y-%m-%d')}")
    text = [machine, *(f"command: {data['command']}" for data in datas),
            f"wall time of the whole comparison: {fmt.seconds(wall)}", "", markdown(rows)]
    return "\n".join(text)
