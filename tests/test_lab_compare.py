"""loralab compare and sweep end to end on tiny models built from configs, plus
every bad input refused with one line and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lab_fixtures as F
import pytest
from conftest import cli, wait_for
from train_support import tiny_bert_dir, tiny_llama_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root, hidden=32, context=256),
            "csv": F.tiny_classify_csv(root / "tickets.csv"),
            "instructions": F.tiny_instructions(root / "instructions.jsonl"),
            "general": F.general_text(root / "general.txt")}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# --- bad input: one line, exit 2, nothing written --------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--methods", "full,bogus"], "unknown method 'bogus'"),
    (["--ranks", "0"], "bad rank '0'"),
    (["--ranks", "8,-4"], "bad rank '-4'"),
    (["--ranks", "8,x"], "bad rank 'x'"),
    (["--ranks", ","], "rank list is empty"),
    (["--rank", "4"], "Use compare's --ranks"),
    (["--no-such-option", "3"], "unknown setting 'no_such_option'"),
    (["--general-text", "README.md"], "needs an sft comparison"),
])
def test_compare_refuses_bad_options(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert cli("compare", "--output", out, *args) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_compare_refuses_bad_general_text(tiny, tmp_path, capsys):
    empty, binary, short = tmp_path / "empty.txt", tmp_path / "blob.txt", tmp_path / "few.txt"
    empty.write_text("  \n")
    binary.write_bytes(bytes(range(256)) * 8)
    short.write_text("just a few words")
    for path, message in ((empty, "is empty"), (binary, "not UTF-8 text"),
                          (short, "too few to measure"), (tmp_path / "nope.txt", "not found")):
        code = cli("compare", "--model", tiny["llama"], "--data", tiny["instructions"],
                   "--general-text", path, "--output", tmp_path / "out")
        assert code == 2
        assert message in one_error_line(capsys)
    (tmp_path / "nul.txt").write_bytes(b"words " * 100 + b"\x00" * 50)
    assert cli("compare", "--model", tiny["llama"], "--data", tiny["instructions"],
               "--general-text", tmp_path / "nul.txt", "--output", tmp_path / "out") == 2
    assert "looks binary" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--alphas", "0"], "bad alpha '0'"),
    (["--alphas", "-2r"], "bad alpha"),
    (["--lrs", "0"], "bad learning rate '0'"),
    (["--methods", "full"], "--methods takes lora and/or qlora"),
    (["--baselines", "lora"], "is swept, not a baseline"),
    (["--ranks", "1,0"], "bad rank '0'"),
    (["--targets", "x", "--lr", "1e-4"], "Use sweep's --lrs"),
])
def test_sweep_refuses_bad_options(tmp_path, capsys, args, message):
    assert cli("sweep", "--output", tmp_path / "out", *args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_output_dir_with_other_files_is_never_touched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert cli("compare", "--output", out, *extra) == 2
        assert "not a loralab comparison" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# --- end to end on tiny models ----------------------------------------------------------

FAST = ("--epochs", "1", "--max-length", "32", "--batch-size", "8")


def results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["runs"]


def mtimes(out: Path, names) -> dict:
    return {n: (out / n / "metrics.json").stat().st_mtime_ns for n in names}


@pytest.mark.slow
def test_compare_end_to_end_with_a_failed_run_rerun_and_refusal(tiny, tmp_path, capsys):
    """full and head train; LoRA fails (its targets match nothing) and becomes a row;
    a re-run keeps the finished runs and tries the failed one again; other
    settings in the same output dir are refused."""
    out = tmp_path / "cmp"
    args = ["compare", "--model", tiny["bert"], "--data", tiny["csv"], "--methods",
            "full,head,lora", "--ranks", "2", "--targets", "no_such_layer", "--output", out,
            *FAST]
    assert cli(*args) == 1  # a run failed; the comparison itself finished
    rows = results(out)
    assert [(r["run"], r["status"]) for r in rows] == [("full", "ok"), ("head", "ok"),
                                                        ("lora-r2", "failed")]
    assert "no_such_layer" in rows[2]["error"] and "\n" not in rows[2]["error"]
    assert (out / "full" / "model").is_dir() and (out / "head" / "adapter").is_dir()
    assert rows[0]["trainable_params"] > rows[1]["trainable_params"] > 0
    assert all(r["peak_memory"]["tensors"]["weights_bytes"] > 0 for r in rows[:2])
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("run,status,method")
    page = (out / "report.html").read_text()
    assert "data-chart='memory'" in page and "data-chart='loss'" in page
    assert "head only: " in page and "of the trainable parameters" in page
    assert "no_such_layer" in page and "Failed: LoRA r=2" in page
    assert "loralab compare --model" in page and "--methods full,head,lora" in page
    printed = capsys.readouterr().out
    assert "full FT" in printed and "1 of 3 runs failed" in printed

    before = mtimes(out, ["full", "head"])
    log = out / "logs" / "lora-r2.log"
    first = log.stat().st_mtime_ns - 10**9  # back-dated: a rewrite must move it forward
    os.utime(log, ns=(first, first))
    assert cli(*args) == 1  # same command: finished runs kept, the failed one redone
    assert [r["status"] for r in results(out)] == ["skipped", "skipped", "failed"]
    assert mtimes(out, ["full", "head"]) == before
    assert log.stat().st_mtime_ns > first
    assert "kept 2 finished run(s)" in capsys.readouterr().out

    saved = (out / "results.json").read_bytes()
    other = [a if a != "1" else "2" for a in map(str, args)]  # --epochs 2
    assert cli(*other) == 2
    assert "holds a different comparison (differs in epochs)" in one_error_line(capsys)
    assert (out / "results.json").read_bytes() == saved
    assert mtimes(out, ["full", "head"]) == before


@pytest.mark.slow
def test_interrupted_compare_keeps_finished_runs_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", tiny["bert"], "--data", tiny["csv"], "--methods",
            "head,lora", "--ranks", "2", "--output", out, "--epochs", "6", "--eval-every", "2",
            "--max-length", "32", "--batch-size", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "loralab", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    state = out / ".lab" / "lab.json"
    checkpoint = out / "lora-r2" / "checkpoint" / "trainer_state.json"

    def head_done_and_lora_checkpointed() -> bool:
        runs = json.loads(state.read_text())["runs"] if state.exists() else {}
        return runs.get("head", {}).get("status") == "ok" and checkpoint.exists()

    wait_for(lambda: proc.poll() is not None or head_done_and_lora_checkpointed(), 300,
             "head to finish and lora-r2 to checkpoint")
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    assert proc.wait(timeout=120) == 130
    head_metrics = (out / "head" / "metrics.json").read_bytes()
    assert [r["run"] for r in results(out)] == ["head"]  # what finished is reported
    assert not (out / "lora-r2" / "metrics.json").exists()
    assert cli(*args) == 0
    assert "resuming lora-r2 from its last checkpoint" in capsys.readouterr().out
    rows = results(out)
    assert [(r["run"], r["status"]) for r in rows] == [("head", "skipped"), ("lora-r2", "ok")]
    assert (out / "head" / "metrics.json").read_bytes() == head_metrics
    assert (out / "lora-r2" / "adapter" / "adapter_config.json").is_file()
    assert rows[1]["trainable_params"] > rows[0]["trainable_params"]


@pytest.mark.slow
def test_sft_compare_measures_forgetting_and_generates_side_by_side(tiny, tmp_path):
    out = tmp_path / "sft"
    assert cli("compare", "--model", tiny["llama"], "--data", tiny["instructions"],
               "--methods", "full,lora", "--ranks", "2", "--general-text", tiny["general"],
               "--generations", "2", "--max-new-tokens", "6", "--output", out,
               "--epochs", "1", "--max-length", "64", "--batch-size", "8") == 0
    rows = results(out)
    assert [r["run"] for r in rows] == ["full", "lora-r2"]
    for row in rows:
        f = row["forgetting"]
        assert f["before_ppl"] > 1 and f["after_ppl"] > 1
        assert f["delta"] == pytest.approx(f["after_ppl"] - f["before_ppl"])
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        gen = json.loads(line)
        assert gen["prompt"].startswith("add ") and gen["reference"].startswith("the sum is")
        assert set(gen["outputs"]) == {"base", "full", "lora-r2"}
        assert all(not v.startswith("(not generated") for v in gen["outputs"].values())
    page = (out / "report.html").read_text()
    assert "data-chart='forgetting'" in page and "Generations side by side" in page


@pytest.mark.slow
def test_sweep_over_ranks_plots_quality_against_rank(tiny, tmp_path):
    out = tmp_path / "sweep"
    assert cli("sweep", "--model", tiny["bert"], "--data", tiny["csv"], "--ranks", "1,2",
               "--baselines", "none", "--output", out, *FAST) == 0
    rows = results(out)
    assert [r["run"] for r in rows] == ["lora-r1-a2-attention", "lora-r2-a4-attention"]
    assert rows[1]["trainable_params"] > rows[0]["trainable_params"]
    config = (out / "lora-r2-a4-attention" / "config.yaml").read_text()
    assert "rank: 2" in config and "alpha: 4.0" in config
    page = (out / "report.html").read_text()
    assert "data-chart='sweep-rank'" in page and "data-chart='sweep-trainable_params'" in page
