"""report.html from synthetic result rows: content, self-containment, and a real
browser (headless Chromium) rendering it without errors."""

from __future__ import annotations

import csv
import io
import re
import shutil
import struct
import subprocess

import lab_fixtures as S
import pytest

from loralab.lab import results as R
from loralab.lab.report import build_report, write_report


def test_verdict_line_reads_ratios_against_full():
    rows = S.classify_rows()
    full, lora = rows[0], rows[2]
    line = R.verdict(lora, full, R.headline_quality(rows), "LoRA r=8")
    # 148k / 22.7M = 0.65 %, 120 s / 41 s = 2.9x, F1 (0.906 - 0.910) = -0.4 pt
    assert line.startswith("LoRA r=8: 0.65% of the trainable parameters, 2.9× faster")
    assert "F1 −0.4 pt vs full FT" in line


def test_memory_breakdown_adds_up_to_the_measured_peak():
    row = S.classify_rows()[0]
    mem = R.memory_breakdown(row)
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["other"] == mem["peak"]
    assert mem["peak"] == row["peak_memory"]["peak_rss_bytes"]
    # CPU runs measure two parts of the rest: they are named, and the sum still holds
    row["peak_memory"].update(process_baseline_bytes=300 * S.MiB,
                              mapped_checkpoint_bytes=50 * S.MiB)
    mem = R.memory_breakdown(row)
    assert mem["process_baseline"] == 300 * S.MiB and mem["mapped_checkpoint"] == 50 * S.MiB
    assert sum(mem[k] for k in R.MEMORY_PARTS) == mem["peak"]
    assert mem["other"] == 50 * S.MiB  # 400 MiB beyond the tensors, 350 of them named
    html = build_report([row], S.META)
    assert "process baseline 300.0 MiB" in html and "mapped checkpoint" in html


def test_headline_quality_per_task():
    assert R.headline_quality(S.classify_rows()) is R.F1
    assert R.headline_quality(S.sft_rows()) is R.PERPLEXITY


def test_labels_name_only_what_varies():
    names = R.labels(S.sweep_rows())
    assert names[:3] == ["full FT", "head only", "LoRA r=1 attention"]
    assert "LoRA r=16 all-linear" in names
    assert R.labels(S.classify_rows()) == ["full FT", "head only", "LoRA r=8", "QLoRA r=8"]
    two_full = [S.row("a", method="full", lr=2e-5), S.row("b", method="full", lr=1e-4)]
    assert R.labels(two_full) == ["full FT lr=2e-05", "full FT lr=0.0001"]


def test_csv_has_one_line_per_run_and_the_error():
    rows = S.classify_rows()
    table = list(csv.DictReader(io.StringIO(R.to_csv(rows))))
    assert [t["run"] for t in table] == ["full", "head", "lora-r8", "qlora-r8"]
    assert table[3]["status"] == "failed" and "bitsandbytes" in table[3]["error"]
    assert float(table[2]["speedup_vs_full"]) == pytest.approx(120 / 41)


def test_report_is_self_contained_with_all_sections():
    page = build_report(S.sft_rows(), {**S.META, "task": "sft", "generations": S.GENERATIONS})
    for chart in ("params", "memory", "time", "quality", "loss", "forgetting"):
        assert f"data-chart='{chart}'" in page
    assert page.count("<svg") == 6
    assert not re.search(r"<(script|link)\b", page)
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    assert "Staying healthy is &lt;important&gt;." in page  # generations are escaped
    assert "loralab compare --model minilm --data tickets" in page
    assert "Reference, full fine-tuning: 134M trainable parameters, 5.0 min, perplexity 8.1, " \
        "general-text perplexity +40.5%" in page
    assert "general-text perplexity +5.2%" in page


def test_sweep_report_has_the_sweep_curves_with_a_full_reference():
    page = build_report(S.sweep_rows(), S.META)
    assert "data-chart='sweep-rank'" in page and "data-chart='sweep-trainable_params'" in page
    assert "full FT (91" in page  # the reference line's legend entry


def test_failed_rows_are_shown_with_their_error():
    page = build_report(S.classify_rows(), S.META)
    assert "bitsandbytes has no CPU kernel" in page
    assert "Failed: QLoRA r=8" in page


def test_report_of_only_failures_still_renders():
    rows = [S.row("full", status="failed", method="full", error="out of memory")]
    page = build_report(rows, S.META)
    assert "out of memory" in page and "<svg" not in page


def test_write_report_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("old report")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("loralab.lab.report.build_report", broken)
    with pytest.raises(RuntimeError):
        write_report(target, S.classify_rows(), S.META)
    assert target.read_text() == "old report"
    assert list(tmp_path.iterdir()) == [target]


# --- a real browser ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(page, profile, *extra):
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
           "--v=0", *extra, page.as_uri()]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """Everything the page wrote to the console, uncaught errors included."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@needs_chromium
def test_console_check_catches_a_broken_page(tmp_path):
    """The check below can fail: a page with a script error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>missing_function();</script></body></html>")
    result = chromium(bad, tmp_path / "profile", "--dump-dom")
    assert any("missing_function" in m for m in console_messages(result.stderr))


@needs_chromium
@pytest.mark.parametrize("kind", ["classify", "sweep", "sft", "honest"])
def test_report_renders_in_headless_chromium(tmp_path, kind):
    rows = {"classify": S.classify_rows, "sweep": S.sweep_rows, "sft": S.sft_rows,
            "honest": S.honest_rows}[kind]()
    page = tmp_path / "report.html"
    write_report(page, rows, {**S.META, "generations": S.GENERATIONS if kind == "sft" else []})
    dom = chromium(page, tmp_path / "profile1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom.stderr) == []
    # the browser parsed the charts into the DOM
    assert len(re.findall(r"<figure class=\"chart\"", dom.stdout)) >= 5
    assert dom.stdout.count("<svg") >= 5 and "id=\"runs\"" in dom.stdout
    if kind == "honest":  # intervals, the baseline row and the caveats reach the DOM
        assert "95% " in dom.stdout and "class=\"baseline\"" in dom.stdout
        assert "id=\"caveats\"" in dom.stdout and "at chance — not learned" in dom.stdout
    shot = tmp_path / "shot.png"
    result = chromium(page, tmp_path / "profile2", f"--screenshot={shot}",
                      "--window-size=1280,2000")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    assert png_size(shot) == (1280, 2000)
    assert shot.stat().st_size > 50_000  # a blank page of this size is ~10 kB
