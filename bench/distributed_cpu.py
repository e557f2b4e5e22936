"""Data parallelism on CPU: one process against two gloo processes, side by side.

Trains minilm + LoRA on the built-in support tickets for a fixed number of
optimizer steps with the same global batch: one process with batch 2b and one
thread, one process with batch 2b and a thread per core, then
``torchrun --nproc_per_node 2`` with batch b and one thread per process.
Reports the wall time of each command (start-up included), the trainer's own
train_seconds and tokens/s, and the eval F1 of each run.

    .venv/bin/python bench/distributed_cpu.py --steps 30 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import free_port, load_average, loralab_cmd, machine, run_job


def train(out: Path, nproc: int, threads: int, batch: int, steps: int) -> dict:
    args = ["train", "--model", "minilm", "--data", "tickets", "--method", "lora",
            "--max-steps", str(steps), "--batch-size", str(batch), "--output", str(out),
            "--quiet"]
    if nproc == 1:
        cmd = loralab_cmd(*args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
               "loralab", *args]
    job = run_job(cmd, env={"OMP_NUM_THREADS": str(threads)}).check()
    m = json.loads((out / "metrics.json").read_text())
    return {"processes": nproc, "threads_per_process": threads, "batch_per_process": batch,
            "global_batch": m["global_batch_size"],
            "steps": m["steps"], "wall_seconds": round(job.seconds, 1),
            "train_seconds": round(m["train_seconds"], 1),
            "tokens_per_second": round(m["tokens_per_second"]),
            "eval_f1": round(m["eval"]["f1"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="global batch per optimizer step")
    args = ap.parse_args()
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        cores = os.cpu_count() or 2
        rows = [train(Path(tmp) / "a", 1, 1, args.batch, args.steps),
                train(Path(tmp) / "b", 1, cores, args.batch, args.steps),
                train(Path(tmp) / "c", 2, 1, args.batch // 2, args.steps)]
    best_single = max(rows[:2], key=lambda r: r["tokens_per_second"])
    print(json.dumps({"machine": machine(),
                      "date": time.strftime("%Y-%m-%d"), "load_average_1min_before": load,
                      "runs": rows,
                      "tokens_per_second_2_processes_over_best_single": round(
                          rows[2]["tokens_per_second"] / best_single["tokens_per_second"], 2)},
                     indent=1))
    print("\n| processes x threads | batch/process | global batch | steps | wall s | train s | "
          "tokens/s | eval F1 |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} x {r['threads_per_process']} | {r['batch_per_process']} | "
              f"{r['global_batch']} | "
              f"{r['steps']} | {r['wall_seconds']} | {r['train_seconds']} | "
              f"{r['tokens_per_second']:,} | {r['eval_f1']} |")


if __name__ == "__main__":
    main()
