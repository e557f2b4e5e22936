"""Honest verdicts (issue 17): intervals in metrics.json, the at-chance flag, the
verdict words following the paired bootstrap, the baseline row and the data's
caveats in the table and the report."""

from __future__ import annotations

import json
import re

import lab_fixtures as S
import pytest
from conftest import cli
from rich.console import Console
from train_support import class_rows, save_tiny, sft_records, write_csv, write_jsonl

from loralab.lab import results as R
from loralab.lab.report import build_report
from loralab.lab.table import results_table
from loralab.train.metrics import classification_metrics, lm_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = ["ham", "spam"]
CAVEATS = S.HONEST_CAVEATS


@pytest.fixture(scope="module")
def rows():
    return S.honest_rows()


def test_metrics_carry_interval_baseline_and_rows():
    y = [0, 1] * 50
    m = classification_metrics(y, [1] * 100, LABELS)
    assert m["positive_label"] == "spam" and m["at_chance"] is True
    assert m["baseline"]["f1"] == pytest.approx(2 / 3) and m["baseline"]["accuracy"] == 0.5
    assert m["predictions"] == [1] * 100 and m["targets"] == y
    lo, hi = m["interval"]["accuracy"]
    assert lo < m["accuracy"] < hi
    good = classification_metrics(y, y, LABELS)
    assert good["at_chance"] is False and good["interval"]["f1"] == [1.0, 1.0]
    lm = lm_metrics(10.0, 20, [1.0, 2.0, 3.0, 4.0], [5, 5, 5, 5])
    lo, hi = lm["interval"]["perplexity"]
    assert lo < lm["perplexity"] < hi


def test_a_run_that_answers_one_class_is_at_chance(rows):
    assert [R.at_chance(r) for r in rows] == [False, True, False, False]
    line = R.verdict(rows[1], rows[0], R.F1, "head only")
    assert line.endswith(R.AT_CHANCE)


def test_verdict_words_follow_the_paired_bootstrap(rows):
    full = rows[0]
    near, far = (R.versus_full(r, full, R.F1) for r in rows[2:])
    assert near["quality_difference"]["paired"] is True
    assert R.delta_text(near, R.F1).endswith(", not distinguishable at this test size")
    assert R.delta_text(far, R.F1).endswith(", worse")
    assert "vs full FT, worse" in R.verdict(rows[3], full, R.F1, "LoRA r=2")
    # an old results.json without predictions: two independent intervals
    def unpaired(row):
        old = {**row, "test": {k: v for k, v in row["test"].items()
                               if k not in ("predictions", "targets")}}
        return R.versus_full(old, full, R.F1)["quality_difference"]

    assert unpaired(rows[3])["paired"] is False and unpaired(rows[3])["verdict"] == "worse"
    # two runs that err on the same rows: pairing cancels the rows' own difficulty
    lo, hi = unpaired(rows[2])["interval"]
    p_lo, p_hi = near["quality_difference"]["interval"]
    assert p_hi - p_lo < (hi - lo) / 3
    # nothing recorded at all: the plain difference, no words
    bare = S.classify_rows()
    assert R.delta_text(R.versus_full(bare[2], bare[0], R.F1), R.F1) == "−0.4 pt"


def test_terminal_table_shows_intervals_baseline_and_caveats(rows):
    console = Console(width=220, record=True)
    console.print(results_table(rows, title="loralab compare"))
    text = console.export_text()
    assert "F1 (class spam)" in text
    assert "one constant answer" in text
    assert text.count("95% ") >= 4 and "at chance — not learned" in text
    assert "not distinguishable at this test size" in text
    for line in CAVEATS:
        assert line.split(":")[0] in text


def test_report_shows_intervals_baseline_caveats_and_per_class(rows):
    page = build_report(rows, S.META)
    lo, hi = (100 * x for x in rows[0]["test"]["interval"]["f1"])
    assert f"95% {lo:.1f}–{hi:.1f}" in page
    assert "<tr class='baseline'>" in page and "one constant answer, the best for each" in page
    assert "F1 (class spam)" in page and "for class &#x27;spam&#x27;" in page
    assert page.count(R.AT_CHANCE) >= 2  # the head-only row and its verdict line
    assert "not distinguishable at this test size" in page and "(paired)" in page
    for line in CAVEATS:
        assert line.replace("'", "&#x27;") in page
    assert page.count("<table class='confusion'>") == 4
    assert "<th>true \\ predicted</th><th>ham</th><th>spam</th>" in page


def test_sft_baseline_is_the_base_model_before_fine_tuning():
    page = build_report(S.sft_rows(), {**S.META, "task": "sft"})
    assert "the base model before fine-tuning" in page and "<td class='num'>21</td>" in page


def test_train_writes_intervals_rows_and_caveats(tmp_path, capsys):
    model = save_tiny(tmp_path, "bert")
    train = write_csv(tmp_path / "train.csv", class_rows(60, seed=1))
    test = write_csv(tmp_path / "test.csv", class_rows(20, seed=2) + class_rows(60, seed=1)[:5])
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", train, "--test-data", test, "--output",
               out, "--method", "lora", "--epochs", 1, "--quiet") == 0
    assert re.search(r"accuracy \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", capsys.readouterr().out)
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["test"]["predictions"]) == len(m["test"]["targets"]) == 25
    assert set(m["test"]["interval"]) == {"accuracy", "precision", "recall", "f1"}
    assert isinstance(m["test"]["at_chance"], bool) and "f1" in m["test"]["baseline"]
    assert all("predictions" not in e for _, e in m["evals"])  # per-row lists: final splits only
    caveats = m["data"]["caveats"]
    assert any(c.startswith("the test split has 25 rows") for c in caveats)
    assert any(" of 25 test texts also appear in the training data" in c for c in caveats)
    assert any(c.startswith("class balance of the training data: ") for c in caveats)


def test_lm_eval_has_a_perplexity_interval(tmp_path):
    model = save_tiny(tmp_path, "llama")
    records = sft_records(24)
    data = write_jsonl(tmp_path / "s.jsonl", records)
    test = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"name the number {i}", "input": "", "output": str(i)} for i in range(6)]
                       + records[:2])
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", data, "--test-data", test, "--output", out,
               "--epochs", 1, "--quiet") == 0
    m = json.loads((out / "metrics.json").read_text())
    lo, hi = m["test"]["interval"]["perplexity"]
    assert lo <= m["test"]["perplexity"] <= hi
    caveats = m["data"]["caveats"]
    assert "the test split has 8 records: its perplexity is a rough figure." in caveats
    assert any(c.startswith("2 of 8 test records also appear in the training") for c in caveats)
    assert m["data"]["test_overlap"] == 2


# --- compare --seeds N ------------------------------------------------------------


def seeded(name: str, seed: int, f1: float, **kw) -> dict:
    row = S.row(f"{name}-s{seed}", **kw)
    row.update(seed=seed, test={"f1": f1, "accuracy": f1})
    return row


def test_seeds_plan_runs_each_method_at_consecutive_seeds():
    from loralab.lab.compare import plan_compare

    plan = plan_compare(methods="full,lora", seeds=3, train_args=("--seed", "7"))
    assert [(r.name, plan.configs[r.name].seed) for r in plan.runs] == [
        ("full-s7", 7), ("full-s8", 8), ("full-s9", 9),
        ("lora-r8-s7", 7), ("lora-r8-s8", 8), ("lora-r8-s9", 9)]
    assert "--seeds 3" in plan.command
    assert [r.name for r in plan_compare(methods="lora").runs] == ["lora-r8"]
    with pytest.raises(Exception, match="--seeds 0"):
        plan_compare(methods="lora", seeds=0)


def test_seed_summary_says_which_varies_more():
    noisy = [seeded("full", 42 + i, f, method="full", trainable=10)
             for i, f in enumerate((0.786, 0.862, 0.891))]
    noisy += [seeded("lora-r8", 42 + i, f, method="lora", rank=8, trainable=1)
              for i, f in enumerate((0.80, 0.85, 0.87))]
    summary = R.seed_summary(noisy, R.F1)
    full = summary["groups"]["full"]
    assert full["mean"] == pytest.approx(84.63, abs=0.01)
    assert full["spread"] == pytest.approx(5.43, abs=0.01)
    assert full["seeds"] == [42, 43, 44] and summary["varies_more"] == "seeds"
    assert R.reference_for(noisy[4], noisy) is noisy[1]  # judged against full FT at its seed
    lines = R.seed_lines(summary, R.F1)
    assert lines[0] == "full FT: F1 84.6 ± 5.4 over 3 seeds"
    assert lines[-1].endswith("seeds vary more: the ranking of the methods is within seed noise.")
    page = build_report(noisy, S.META)
    assert "<section id='seeds'>" in page and "84.6 ± 5.4 over 3 seeds" in page
    steady = [seeded("full", 42 + i, 0.90 + i / 1000, method="full", trainable=10)
              for i in range(2)] + [seeded("head", 42 + i, 0.70 + i / 1000, method="head")
                                    for i in range(2)]
    assert R.seed_summary(steady, R.F1)["varies_more"] == "methods"
    assert R.seed_summary(S.classify_rows(), R.F1) is None  # no --seeds: no section


# --- compare/sweep --dry-run ---------------------------------------------------------


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys, monkeypatch):
    from train_support import class_rows as rows_of

    monkeypatch.setenv("COLUMNS", "200")  # the table's 8 columns on one line each

    model = save_tiny(tmp_path, "bert")
    data = write_csv(tmp_path / "d.csv", rows_of(60, seed=1))
    out = tmp_path / "cmp"
    assert cli("compare", "--dry-run", "--model", model, "--data", data, "--methods",
               "full,lora", "--seeds", 2, "--output", out, "--batch-size", 8,
               "--epochs", 2) == 0
    text = capsys.readouterr().out
    assert "4 runs, nothing trained" in text and not out.exists()
    # 60 rows less the eval and test splits (10% each): 48 rows, 6 batches of 8, 2 epochs
    for run in ("full-s42", "full-s43", "lora-r8-s42", "lora-r8-s43"):
        line = next(x for x in text.splitlines() if run in x and "timing" not in x)
        assert " 12 " in line and ("MiB" in line or "KiB" in line or "GiB" in line), line
        assert re.search(r"\d s\s*[│|]?\s*$", line.rstrip()), line  # an expected time
    assert "timing 5 steps of full-s42 (1 of 2 training shapes)" in text  # seeds share one
    assert "expected training time:" in text
    assert cli("sweep", "--dry-run", "--model", model, "--data", data, "--ranks", "2,4",
               "--output", out) == 0
    assert "nothing trained" in capsys.readouterr().out and not out.exists()


def test_dry_run_time_is_within_2x_of_the_run(tmp_path, capsys):
    """The dry run's expected training time, from a few timed steps in its own
    process, against the training seconds the runs then take."""
    import json as _json

    from train_support import class_rows as rows_of

    model = save_tiny(tmp_path, "bert")
    data = write_csv(tmp_path / "d.csv", rows_of(300, seed=2))
    args = ["--model", model, "--data", data, "--methods", "full,lora", "--batch-size", 4,
            "--epochs", 1, "--max-length", 64]
    out = tmp_path / "cmp"
    assert cli("compare", "--dry-run", *args, "--output", out) == 0
    text = capsys.readouterr().out
    total = re.search(r"expected training time: ([\d.]+) (s|min)", text)
    expected = float(total.group(1)) * (60 if total.group(2) == "min" else 1)
    assert cli("compare", *args, "--output", out) == 0
    metrics = [_json.loads((out / run / "metrics.json").read_text())
               for run in ("full", "lora-r8")]
    measured = sum(m["train_seconds"] - m["eval_seconds"] for m in metrics)  # training only
    assert measured / 2 <= expected <= measured * 2, (expected, measured)


def test_quality_chart_draws_each_interval_as_an_error_bar(rows):
    from loralab.lab import charts

    args = (["a", "b"], [80.0, 70.0], ["#1f77b4", "#ff7f0e"], "Quality", "F1", ["80", "70"])
    assert charts.INTERVAL_COLOR in charts.hbar(*args, intervals=[(75.0, 85.0), None])
    assert charts.INTERVAL_COLOR not in charts.hbar(*args)
    quality = R.headline_quality(rows)
    assert sum(R.interval(r, quality) is not None for r in rows) >= 2
    assert charts.INTERVAL_COLOR in build_report(rows, S.META)
