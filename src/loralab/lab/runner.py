"""Run one ``loralab train`` in its own process, so its peak memory is its own,
and turn its exit into a status and a one-line error."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from loralab.errors import Terminated
from loralab.io import atomic_write_text

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_ENV = "LORALAB_PARENT_PID"  # a child that sees it dies with that parent
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@dataclass
class Outcome:
    ok: bool
    error: str | None
    seconds: float


def write_run_yaml(path: Path, config: dict, run_dir: Path) -> None:
    """The exact config the subprocess trains with (resolved, plus where to write)."""
    data = {**config, "output": str(run_dir), "overwrite": True, "quiet": True}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def train_command(config_yaml: Path, resume: Path | None = None) -> list[str]:
    if resume is not None:  # the run dir's own config.yaml is the recipe
        return [sys.executable, "-m", "loralab", "train", "--resume", str(resume), "--quiet"]
    return [sys.executable, "-m", "loralab", "train", str(config_yaml)]


def resumable(run_dir: Path) -> bool:
    """An interrupted run that wrote a checkpoint and did not finish."""
    return ((run_dir / "checkpoint" / "trainer_state.json").is_file()
            and not (run_dir / "metrics.json").exists())


def latest_record(run_dir: Path) -> dict | None:
    """The last training record of a run's log.jsonl, if there is one yet."""
    path = run_dir / "log.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "loss" in record:
            return record
    return None


def error_line(output: str, returncode: int) -> str:
    """The one line that says why a run failed."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
        return f"training process killed by {name}{hint}"
    tail = lines[-1] if lines else "no output"
    return f"training process exited with code {returncode}: {tail}"[:600]


def run_training(config_yaml: Path, run_dir: Path, log_path: Path, on_poll=None,
                 resume: bool = False) -> Outcome:
    """Train in a subprocess (``resume``: continue the interrupted run in
    ``run_dir``); ``on_poll(record)`` is called about twice a second with the
    latest log record so a progress display can follow along."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        command = train_command(config_yaml, run_dir if resume else None)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with stop_signals_raise():
                while proc.poll() is None:
                    if on_poll:
                        on_poll(latest_record(run_dir))
                    time.sleep(0.5)
        except Terminated:  # SIGTERM/SIGHUP: stop the run now (its checkpoint is whole)
            _stop(proc, graceful=False)
            raise
        except BaseException:  # Ctrl-C: let the run stop cleanly, then give up
            _stop(proc)
            raise
    seconds = time.perf_counter() - start
    ok = proc.returncode == 0 and (run_dir / "metrics.json").is_file()
    if ok:
        return Outcome(True, None, seconds)
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode == 0:
        return Outcome(False, f"training finished without writing {run_dir / 'metrics.json'}",
                       seconds)
    return Outcome(False, error_line(output, proc.returncode), seconds)


def _stop(proc: subprocess.Popen, graceful: bool = True) -> None:
    """Stop a run on Ctrl-C. From a terminal the child got SIGINT too; otherwise
    send it one, then give it time to keep its last checkpoint. Not graceful
    (the lab was told to terminate): SIGTERM at once, SIGKILL after 10 s."""
    steps = ((lambda: None, 2), (lambda: proc.send_signal(signal.SIGINT), 30),
             (proc.terminate, 10), (proc.kill, None))
    if not graceful:
        steps = steps[2:]
    for action, timeout in steps:
        action()
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so a killed ``compare`` leaves no training
    child behind. Called first thing in the child (``loralab`` and the lab
    worker, when ``LORALAB_PARENT_PID`` is set), not as a ``preexec_fn``: that
    is unsafe in a process with threads (rich's refresh thread). A parent that
    died before the call is seen by ``getppid``. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    if parent is None:
        parent = int(os.environ.get(PARENT_ENV) or 0) or None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_raise():
    """While a child runs, SIGTERM and SIGHUP raise :class:`Terminated` (by
    default they would end this process at once and orphan the child)."""
    def handler(signum, frame):
        raise Terminated(signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
