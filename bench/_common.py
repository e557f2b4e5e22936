"""What every benchmark script needs, in one place: where the real data sets
are, what machine the figures came from, a free port for a server, and a job
run in its own process (its own peak memory, its own threads), timed.

The scripts run as ``.venv/bin/python bench/NAME.py``, so ``bench/`` is on
``sys.path`` and they ``from _common import ...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / ".." / "shared" / "datasets"


def dataset(*parts: str) -> Path:
    """A path under ``../shared/datasets``; exits with one line when it is absent."""
    path = DATASETS.joinpath(*parts)
    if not path.exists():
        sys.exit(f"{path} not found: this benchmark needs ../shared/datasets "
                 f"(see its README).")
    return path.resolve()


def machine() -> str:
    """``"2 cores (AMD EPYC ..., AVX2), 24 GiB RAM"``: the line BENCHMARKS.md quotes."""
    from loralab.lab.environment import cpu_name, total_memory_bytes

    cpu = cpu_name()
    try:
        cpu += ", AVX2" if " avx2" in Path("/proc/cpuinfo").read_text() else ""
    except OSError:
        pass
    mem = total_memory_bytes()
    return f"{os.cpu_count()} cores ({cpu})" + (f", {mem / 2**30:.0f} GiB RAM" if mem else "")


def load_average() -> float:
    """The 1-minute load average: how busy the (shared) machine was."""
    return round(os.getloadavg()[0], 2)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loralab_cmd(*args) -> list[str]:
    """``loralab ARGS...`` with this interpreter (the venv the benchmark runs in)."""
    return [sys.executable, "-m", "loralab", *map(str, args)]


@dataclass
class Job:
    """A finished subprocess: exit code, its output (when captured) and wall time."""

    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> Job:
        """The job itself, or exit with its command and the tail of its stderr."""
        if self.returncode != 0:
            sys.exit(f"{' '.join(self.cmd)} exited with {self.returncode}:\n"
                     f"{self.stderr[-3000:]}")
        return self

    def last_json(self) -> dict:
        """The JSON object a job prints as its last line of stdout."""
        return json.loads(self.stdout.strip().splitlines()[-1])

    def error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exited with {self.returncode}"


def run_job(cmd: list[str], *, env: dict | None = None, capture: bool = True) -> Job:
    """Run ``cmd`` to completion in its own process, timed; ``env`` adds variables
    to this process's environment; ``capture=False`` lets it print as it goes."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=capture, text=True, check=False,
                          env={**os.environ, **(env or {})})
    return Job(list(cmd), proc.returncode, proc.stdout or "", proc.stderr or "",
               time.perf_counter() - start)
