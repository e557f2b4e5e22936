"""bench/gpu.py is known to work before a GPU is lent: its --dry-run (CPU, tiny
shapes, fp32) runs every row on both sides through bench/gpu_run.sh, and bad
input (no CUDA, a GPU too small for a shape) stops it in one line, exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu

pytestmark = pytest.mark.usefixtures("single_thread")

ROW_FIELDS = {"model", "method", "side", "status", "error", "batch_size", "seq_len",
              "planned_batch", "estimator_max_batch", "tokens", "seconds", "tokens_per_second",
              "flops_per_token", "mfu", "peak_allocated_bytes", "peak_reserved_bytes",
              "peak_rss_bytes", "baseline_allocated_bytes", "estimate_bytes",
              "estimate_error_percent", "trainable_params", "trainable_dtype", "loss_first",
              "loss_last"}
ENV_FIELDS = {"device_name", "driver", "torch", "cuda", "transformers", "peft", "bitsandbytes",
              "peak_tflops_bf16", "date", "command", "dry_run", "seq_len", "token_budget"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The GPU machine's script, run as on a CPU (GPU_RUN_DRY=1): bench --dry-run
    and the GPU tests (which skip), everything under $OUT."""
    out = tmp_path_factory.mktemp("gpu-out")
    env = dict(os.environ, OUT=str(out), GPU_RUN_DRY="1", OMP_NUM_THREADS="1",
               BENCH_LIMIT="600", BENCH_CAP="600", TEST_CAP="300")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh")], check=False,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    [path] = out.glob("gpu-dry-run-*.json")
    return json.loads(path.read_text()), out, path


@pytest.mark.slow  # one subprocess: ~40 s of CPU for the whole dry run
def test_dry_run_has_every_row_and_field(dry_run):
    result, _, _ = dry_run
    assert ENV_FIELDS <= set(result["environment"])
    assert result["environment"]["dry_run"] is True
    rows = result["rows"]
    expected = {(n, m, side) for n, m in gpu.PLAN for side in gpu.SIDES}
    assert {(r["model"], r["method"], r["side"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        if r["side"] == "trl" and gpu.trl_missing():
            assert r["status"] == "skipped" and "not installed" in r["error"]
            continue
        assert r["status"] == "ok", r
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["tokens"] > 0
        assert r["tokens_per_second"] > 0 and r["flops_per_token"] > 0
        assert r["estimate_bytes"] > 0 and r["peak_rss_bytes"] > 0
        assert r["mfu"] is None and r["peak_allocated_bytes"] is None  # CPU: no GPU peak
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])


@pytest.mark.slow  # one subprocess: ~40 s of CPU for the whole dry run
def test_both_sides_train_the_same_thing(dry_run):
    """Same weights, parameters trained and batch on both sides; losses agree."""
    result, _, _ = dry_run
    by_key = {}
    for r in result["rows"]:
        by_key.setdefault((r["model"], r["method"]), {})[r["side"]] = r
    for (name, method), sides in by_key.items():
        ours = sides["loralab"]
        peers = [sides[k] for k in ("hf_peft", "trl") if sides[k]["status"] == "ok"]
        assert peers and peers[0]["side"] == "hf_peft"
        for peer in peers:
            assert ours["trainable_params"] == peer["trainable_params"], (name, method, peer)
            if not (peer["side"] == "trl" and method == "qlora"):  # TRL casts QLoRA's to bf16
                assert ours["trainable_dtype"] == peer["trainable_dtype"], (name, method, peer)
            assert ours["batch_size"] == peer["batch_size"] and ours["tokens"] == peer["tokens"]
            assert ours["loss_first"] == pytest.approx(peer["loss_first"], rel=0.02)
        assert ours["loss_first"] == pytest.approx(math.log(gpu.TINY["vocab_size"]), rel=0.1)


@pytest.mark.slow  # one subprocess: ~40 s of CPU for the whole dry run
def test_dry_run_writes_the_table_and_logs(dry_run):
    _, out, path = dry_run
    table = path.with_suffix(".md").read_text()
    assert table.startswith("CPU dry run (tiny shapes, fp32; not performance)")
    assert table.count("\n| ") == 1 + len(gpu.PLAN)  # header + one line per (model, method)
    for name in ("bench.log", "gpu_tests.log", "env.txt"):
        assert (out / name).stat().st_size > 0
    assert "needs a CUDA GPU" in (out / "gpu_tests.log").read_text()  # skipped here


def test_flops_per_token_counts_6n_4n_and_attention():
    fields = {"num_attention_heads": 4, "head_dim": 8, "hidden_size": 16, "num_hidden_layers": 2}
    attention = 12 * 2 * 100 * 32
    assert gpu.flops_per_token(fields, 1000, 0, "full", 100) == 6000 + attention
    assert gpu.flops_per_token(fields, 1000, 10, "lora", 100) == 4000 + 60 + attention


def test_peak_table_reads_device_names():
    assert gpu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("Some Future GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_device_cuda_without_cuda_is_one_line_exit_2(capsys):
    assert gpu.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: --device cuda, but no CUDA GPU is visible") and "Fix:" in err


def test_gpu_too_small_says_what_fits(capsys, tmp_path):
    # the tiny twins need 1.6-2.2 MB at batch 1 x 64 (fp32); 1.75 MB holds some of them
    code = gpu.main(["--dry-run", "--gpu-memory", "1.75MB", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the GPU is too small:")
    assert "llama-3.1-8b lora needs" in err and "llama-3.2-1b full needs" in err
    fits = err.split("The estimator says these fit:")[1]
    assert "llama-3.2-1b lora (batch <= " in fits and "8b" not in fits and "Fix:" in err
    assert not list(tmp_path.iterdir())  # stopped before any row ran
