"""Progress display (rich bar: loss, lr, tokens/s, ETA) and the log.jsonl file.

Only the main process reports; the bar is off when stderr is not a terminal
or ``quiet`` is set, and the JSON lines are written either way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Reporter:
    def __init__(self, log_path: Path | None, total_steps: int, enabled: bool,
                 description: str = "training", start_step: int = 0):
        self.log_path = log_path
        self.total = total_steps
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                transient=False)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total_steps,
                                          completed=start_step, stats="")

    def _write(self, record: dict) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def step(self, step: int, record: dict | None) -> None:
        """Advance the bar to ``step``; ``record`` (a logging step) goes to log.jsonl."""
        if record is not None:
            self._write(record)
        if self.bar is not None:
            stats = ""
            if record is not None:
                stats = (f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                         f"{record['tokens_per_second']:.0f} tok/s")
                if record.get("padded_tokens"):  # passes per step, real share of padded
                    real = record["train_tokens"] / record["padded_tokens"]
                    stats += f" {record['micro_batches_per_step']:g} mb/step {real:.0%} real"
                self.bar.update(self.task, completed=step, stats=stats)
            else:
                self.bar.update(self.task, completed=step)

    def eval(self, step: int, metrics: dict, epoch: float) -> None:
        short = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._write({"step": step, "epoch": epoch, "eval": short})
        if self.bar is not None:
            text = " ".join(f"{k} {v:.4f}" for k, v in short.items()
                            if k != "n" and not isinstance(v, bool))  # at_chance: not a score
            self.bar.console.print(f"step {step}: eval {text}")

    def note(self, text: str) -> None:
        """One line for the person watching: above the bar, else on stderr."""
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def truncate_log(log_path: Path, step: int) -> None:
    """Keep the records up to ``step`` (a resumed run rewrites what follows)."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            kept.append(line)
    from loralab.io import atomic_write_text

    atomic_write_text(log_path, "".join(k + "\n" for k in kept))
