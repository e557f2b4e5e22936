"""Crashes and full disks: SIGKILL at several points of a run (mid-window, inside
a checkpoint write, between its two renames, inside the final save) leaves no
corrupt checkpoint and a resume ends identical to an unbroken run; killing
`compare` stops its training child; a full or read-only disk is refused before
the model loads, or ends in one line that keeps the last checkpoint. Counted in
docs/reliability.md."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file
from train_support import class_rows, save_tiny, write_csv

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).parents[1] / "src"

# `loralab train ...` in a fresh interpreter that SIGKILLs itself at a chosen
# point: MODE "step N" after optimizer step N; "save PART K" right after the K-th
# safetensors file written into a temporary whose name holds PART; "rename PART K"
# just before the K-th rename of such a temporary into place.
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
mode, part, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
hits = [0]
def hit():
    hits[0] += 1
    if hits[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "step":
    import loralab.train.loop as L
    step = L.Loop.train_step
    def train_step(self, micro):
        out = step(self, micro)
        hit()
        return out
    L.Loop.train_step = train_step
elif mode == "save":
    import safetensors.torch as st
    save = st.save_file
    def save_file(tensors, filename, *a, **kw):
        save(tensors, filename, *a, **kw)
        if part in str(filename):
            hit()
    st.save_file = save_file
else:
    replace = os.replace
    def patched(src, dst, *a, **kw):
        if part in os.path.basename(str(src)):
            hit()
        return replace(src, dst, *a, **kw)
    os.replace = patched
from loralab.cli import main
main(sys.argv[4:])
"""

# (mode, part, k): the kill points; the run checkpoints at steps 5, 10 and 14
KILLS = {
    "mid-window after step 7": ("step", "-", 7),
    "inside the 2nd checkpoint write": ("save", ".checkpoint.tmp-", 2),
    "between the 2nd checkpoint's renames": ("rename", ".checkpoint.tmp-", 2),
    "inside the best/ write": ("save", ".best.tmp-", 2),
    "inside the final adapter write": ("save", ".adapter.tmp-", 1),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = save_tiny(root, "bert")
    data = write_csv(root / "d.csv", class_rows(120))
    full = root / "full"
    assert cli(*train_args(model, data, full)) == 0
    return model, data, full


def train_args(model, data, out):
    # dropout on: the restored RNG matters; log every 3 steps, checkpoint every 5
    return ["train", "--model", model, "--data", data, "--output", out, "--method", "lora",
            "--dropout", "0.1", "--max-steps", "14", "--batch-size", "8", "--lr", "0.01",
            "--eval-every", "5", "log_every=3", "--quiet"]


def run_killed(mode, part, k, argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", KILLER, mode, part, str(k), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def log_records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items()
             if k not in ("tokens_per_second", "elapsed")}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_whole_checkpoint(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoint"
    if not ckpt.exists():
        return
    json.loads((ckpt / "trainer_state.json").read_text())
    load_file(str(ckpt / "trainable.safetensors"))
    torch.load(ckpt / "optimizer.pt", weights_only=False)


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("point", list(KILLS))
def test_sigkill_then_resume_is_identical(setup, tmp_path, point):
    model, data, full = setup
    out = tmp_path / "run"
    proc = run_killed(*KILLS[point], train_args(model, data, out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    assert_whole_checkpoint(out)
    assert cli("train", "--resume", out, "--quiet") == 0
    assert leftovers(out) == []  # the killed run's temporaries are gone
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for key in ("loss_curve", "evals", "eval", "test", "best_step", "steps"):
        assert a[key] == b[key], key
    assert log_records(out) == log_records(full)
    wa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- compare: its children do not outlive it ----------------------------------

def _start_compare(model, data, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "loralab", "compare", "--model", model,
                             "--data", data, "--methods", "lora", "--output", out,
                             "--epochs", "500", "--generations", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _training_child(proc: subprocess.Popen, timeout: float = 120):
    psutil = pytest.importorskip("psutil")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        kids = psutil.Process(proc.pid).children()
        if kids:
            return kids[0]
        time.sleep(0.2)
    raise AssertionError("compare started no training child")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_compare_takes_its_children_along(setup, tmp_path):
    """SIGTERM: compare stops the child and exits 143. SIGKILL (no handler can
    run): the kernel's parent-death signal stops the child."""
    psutil = pytest.importorskip("psutil")
    model, data, _ = setup
    termed = _start_compare(model, data, tmp_path / "a")
    killed = _start_compare(model, data, tmp_path / "b")
    children = [_training_child(termed), _training_child(killed)]
    termed.send_signal(signal.SIGTERM)
    killed.kill()
    assert termed.wait(timeout=60) == 128 + signal.SIGTERM
    killed.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"training children outlived compare: {alive}"
    assert "Traceback" not in termed.stderr.read().decode()


def test_progress_lines_when_output_is_a_file(monkeypatch):
    """Redirected, compare prints one plain progress line per interval."""
    import io

    from rich.console import Console

    from loralab.lab import execute

    monkeypatch.setattr(execute, "PROGRESS_EVERY_S", 0.0)
    buf = io.StringIO()
    progress = execute.make_progress(Console(file=buf, width=120))
    task = progress.add_task("", total=None)
    poll = execute._follow("lora-r8", progress, task)
    for record in (None, {"step": 3, "loss": 1.5}, {"step": 3, "loss": 1.5},
                   {"step": 6, "loss": 1.2}):
        poll(record)
    lines = [ln for ln in buf.getvalue().splitlines() if "lora-r8" in ln]
    assert lines == ["lora-r8: step 3 · loss 1.500", "lora-r8: step 6 · loss 1.200"]


# ---- leftovers ------------------------------------------------------------------

def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    from loralab import io as lio

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = f"{lio.HOST}-{os.getpid()}"
    gone = f"{lio.HOST}-{dead.pid}"
    (tmp_path / f".adapter.tmp-{gone}-abc123").mkdir()
    (tmp_path / f".metrics.json.tmp-{gone}-x1").write_text("{")
    (tmp_path / f".checkpoint.old-{gone}").mkdir()  # killed between the renames
    (tmp_path / f".model.tmp-{mine}-live99").mkdir()  # a save under way
    (tmp_path / f".model.tmp-otherhost-{dead.pid}-zz").mkdir()  # not ours to judge
    gguf = lio.owned_temp_path(tmp_path / "model.gguf")  # a one-file writer's temporary
    gguf.with_name(gguf.name.replace(mine, gone)).write_bytes(b"GGUF")
    assert lio.remove_stale_temps(tmp_path) == 4
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["checkpoint", f".model.tmp-{mine}-live99",
                            f".model.tmp-otherhost-{dead.pid}-zz"])


def test_merge_removes_a_killed_merges_leftovers(setup, tmp_path):
    full = setup[2]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from loralab.io import HOST

    stale = tmp_path / f".merged.tmp-{HOST}-{dead.pid}-abcdef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    assert cli("merge", "--adapter", full / "adapter", "--output", tmp_path / "merged") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ---- full and read-only disks (a small tmpfs; root can mount it) ---------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_line(capsys, notes_first: bool = False) -> str:
    """The one error line; ``notes_first``: a run that started may have printed
    its notices (warnings, data notes) before it."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert "Traceback" not in "\n".join(lines), lines
    assert errors == lines[-1:] and (notes_first or len(lines) == 1), lines
    return errors[0]


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a file that leaves about ``leave`` bytes free on ``disk``."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(free, 0))
    return filler


def test_no_room_and_read_only_refused_before_loading(setup, tmp_path, capsys, monkeypatch):
    model, data, _ = setup
    from loralab.train import run

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "load_for_method", no_load)
    with tmpfs(tmp_path / "small", "2m") as disk:
        capsys.readouterr()
        assert cli("train", "--model", model, "--data", data, "--output", disk / "run",
                   "--method", "full", "--quiet") == 2
        assert "not enough free disk" in one_line(capsys)
        assert list(disk.iterdir()) == []
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as disk:
        for argv in (["train", "--model", model, "--data", data, "--output", disk / "run"],
                     ["merge", "--adapter", setup[2] / "adapter", "--output", disk / "m"],
                     ["compare", "--model", model, "--data", data, "--output", disk / "c"]):
            assert cli(*argv) == 2
            assert "read-only" in one_line(capsys)


def test_disk_full_mid_checkpoint_keeps_the_last_one(setup, tmp_path, capsys, monkeypatch):
    model, data, _ = setup
    import loralab.train.checkpoint as ckpt

    save = ckpt.save_checkpoint
    calls = []

    def save_on_a_full_disk(target, *args):
        calls.append(target)
        if len(calls) == 2:
            fill(target.parent.parent)  # the tmpfs
        save(target, *args)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_on_a_full_disk)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "run"
        capsys.readouterr()
        assert cli(*train_args(model, data, out)) == 2
        err = one_line(capsys, notes_first=True)
        assert "no space left" in err and "step 10" in err and "(step 5) is kept" in err, err
        assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 5
        assert_whole_checkpoint(out)
        assert leftovers(out) == []
        monkeypatch.setattr(ckpt, "save_checkpoint", save)
        (disk / "filler").unlink()
        assert cli("train", "--resume", out, "--quiet") == 0
        assert (out / "metrics.json").exists()


def test_disk_full_at_the_final_save_keeps_the_checkpoint(setup, tmp_path, capsys,
                                                          monkeypatch):
    """The issue's case: full fine-tuning trains to the end, then the model's
    save finds the disk full. One line; the run resumes once there is room."""
    model, data, _ = setup
    from loralab.train import run

    save = run._save

    def save_on_a_full_disk(loop, cfg, tok, run_dir, *args):
        fill(run_dir.parent, leave=4096)
        save(loop, cfg, tok, run_dir, *args)

    monkeypatch.setattr(run, "_save", save_on_a_full_disk)
    with tmpfs(tmp_path / "disk", "32m") as disk:
        out = disk / "run"
        argv = train_args(model, data, out)
        argv[argv.index("lora")] = "full"
        capsys.readouterr()
        assert cli(*argv) == 2
        err = one_line(capsys, notes_first=True)
        assert "no space left" in err and "--resume" in err, err
        assert not (out / "model").exists() and leftovers(out) == []
        assert_whole_checkpoint(out)
        monkeypatch.setattr(run, "_save", save)
        (disk / "filler").unlink()
        assert cli("train", "--resume", out, "--quiet") == 0
        assert (out / "model" / "config.json").exists()
