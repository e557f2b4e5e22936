"""Interrupted runs: SIGKILL mid-way then --resume ends with the same metrics
as an uninterrupted run; Ctrl-C stops cleanly and keeps the last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli
from train_support import class_rows, save_tiny, write_csv

# Runs `loralab train ...` in a fresh interpreter and delivers ``signal`` to
# itself right after optimizer step ``at``: a kill at a known point.
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import loralab.train.loop as L
at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
step = L.Loop.train_step
def train_step(self, micro):
    out = step(self, micro)
    if self.state.step + 1 == at:
        os.kill(os.getpid(), sig)
    return out
L.Loop.train_step = train_step
from loralab.cli import main
main(sys.argv[3:])
"""


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny(root, "bert")
    data = write_csv(root / "d.csv", class_rows(120))
    return model, data


def args(model, data, out, log_every=5):
    # dropout on, so the restored RNG state matters; eval/checkpoint every 5 steps
    return ["train", "--model", model, "--data", data, "--output", out, "--method", "lora",
            "--dropout", "0.1", "--epochs", "3", "--batch-size", "8", "--lr", "0.01",
            "--eval-every", "5", f"log_every={log_every}", "--quiet"]


def log_records(run_dir) -> list[dict]:
    """log.jsonl without the wall-clock fields (they differ run to run)."""
    out = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in ("tokens_per_second", "elapsed")})
    return out


def run_killed(at: int, sig: str, argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    return subprocess.run([sys.executable, "-c", KILLER, str(at), sig, *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(setup, tmp_path):
    model, data = setup
    full, killed = tmp_path / "full", tmp_path / "killed"
    # log every 3 steps, checkpoint every 5: the checkpoint at step 10 falls inside a
    # logging window (steps 10-12), which the resumed run must average whole
    assert cli(*args(model, data, full, log_every=3)) == 0
    proc = run_killed(12, "SIGKILL", args(model, data, killed, log_every=3))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "metrics.json").exists()
    state = json.loads((killed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 10  # the last checkpoint before the kill
    assert cli("train", "--resume", killed, "--quiet") == 0
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["loss_curve"] == b["loss_curve"]
    assert a["evals"] == b["evals"]
    assert a["test"] == b["test"] and a["eval"] == b["eval"]
    log = log_records(killed)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice after the resume
    assert log == log_records(full)  # the same lines: losses, lrs, evals


@pytest.mark.slow
def test_ctrl_c_keeps_last_checkpoint(setup, tmp_path):
    model, data = setup
    out = tmp_path / "run"
    proc = run_killed(8, "SIGINT", args(model, data, out))
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted at step" in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 5
    assert cli("train", "--resume", out, "--quiet") == 0
    assert (out / "metrics.json").exists() and (out / "adapter").is_dir()


def test_resume_refuses_what_it_cannot_continue(setup, tmp_path, capsys):
    model, data = setup
    assert cli("train", "--resume", tmp_path / "nothing", "--quiet") == 2
    assert "no loralab run" in capsys.readouterr().err
    out = tmp_path / "done"
    assert cli("train", "--model", model, "--data", data, "--output", out, "--epochs", 1,
               "--quiet") == 0
    capsys.readouterr()
    assert cli("train", "--resume", out, "--quiet") == 2
    assert "already finished" in capsys.readouterr().err
