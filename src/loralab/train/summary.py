"""The closing summary of a run, printed from its metrics.json."""

from __future__ import annotations

import json
from pathlib import Path


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _score(scores: dict, key: str) -> str:
    """'f1 0.8125 [0.7410, 0.8790]': the figure and its 95 % bootstrap interval."""
    lo_hi = (scores.get("interval") or {}).get(key)
    span = f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""
    return f"{key} {scores[key]:.4f}{span}"


def print_summary(run_dir: Path, as_json: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    console = Console()
    table = Table(title=f"{metrics['method']} · {metrics['task']} · {metrics['model']}",
                  show_header=False)
    peak = metrics["peak_memory"]
    peak_bytes = peak.get("peak_rss_bytes", peak.get("peak_allocated_bytes"))
    tensors = peak["tensors"]
    rows = [
        ("trainable params", (f"{metrics['trainable_params']:,} of {metrics['total_params']:,} "
                             f"({metrics['trainable_percent']:.3f} %)")),
        ("train time", f"{metrics['train_seconds']:.1f} s, {metrics['steps']} steps"),
        ("tokens/s", f"{metrics['tokens_per_second']:,.0f}"),
        ("peak memory", (f"{_mib(peak_bytes)} ({peak['device']}); tensors: weights "
                         f"{_mib(tensors['weights_bytes'])}, "
                         f"grads {_mib(tensors['gradients_bytes'])}, "
                         f"optimizer {_mib(tensors['optimizer_bytes'])}")),
        ("artifact", _mib(metrics["artifact_bytes"])),
    ]
    for split in ("eval", "test"):
        scores = metrics.get(split) or {}
        keys = [k for k in ("accuracy", "f1", "loss", "perplexity") if k in scores]
        if keys:
            rows.append((split, "  ".join(_score(scores, k) for k in keys)
                         + ("  at chance — not learned" if scores.get("at_chance") else "")))
    if "forgetting" in metrics:
        f = metrics["forgetting"]
        rows.append(("forgetting", (f"ppl {f['before_ppl']:.2f} -> {f['after_ppl']:.2f} "
                                   f"({f['percent']:+.1f} %)")))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    console.print(f"run dir: {run_dir}")
