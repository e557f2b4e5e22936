"""`loralab compare --tune-lr` and the lab's named LoRA variants: the search plan,
the choice of rate, the report, and one end-to-end run on a tiny BERT."""

from __future__ import annotations

import json

import lab_fixtures as F
import pytest
from conftest import cli

from loralab.errors import LoralabError
from loralab.lab.compare import plan_compare
from loralab.lab.lr_search import candidate_name, choose, search_plan
from loralab.lab.plan import variant_of
from loralab.lab.report import build_report
from loralab.lab.sweep import plan_sweep

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = ("--epochs", "1", "--max-length", "32", "--batch-size", "8")


def test_named_variants_plan_their_settings(tmp_path):
    plan = plan_compare(methods="lora,dora,qdora,pissa,olora,rslora,lora-plus,head",
                        ranks="4", output=tmp_path)
    cfg = {r.name: plan.configs[r.name] for r in plan.runs}
    assert list(cfg) == ["lora-r4", "dora-r4", "qdora-r4", "pissa-r4", "olora-r4",
                         "rslora-r4", "lora-plus-r4", "head"]
    assert (cfg["dora-r4"].method, cfg["dora-r4"].use_dora) == ("lora", True)
    assert (cfg["qdora-r4"].method, cfg["qdora-r4"].use_dora) == ("qlora", True)
    assert cfg["pissa-r4"].init_lora_weights == "pissa"
    assert cfg["lora-plus-r4"].lora_plus_ratio == 16.0 and cfg["rslora-r4"].use_rslora
    assert {n: variant_of(c) for n, c in cfg.items()} == {
        "lora-r4": "lora", "dora-r4": "dora", "qdora-r4": "qdora", "pissa-r4": "pissa",
        "olora-r4": "olora", "rslora-r4": "rslora", "lora-plus-r4": "lora-plus",
        "head": "head"}
    assert "use_dora" not in plan.shared()  # a run's own setting, not the comparison's


@pytest.mark.parametrize("kwargs, message", [
    ({"train_args": ["--use-dora"]}, "Use compare's --methods (named variants"),
    ({"tune_lr": True, "lr_factors": "1"}, "at least two factors"),
    ({"tune_lr": True, "lr_factors": "1,-3"}, "bad learning-rate factor '-3'"),
    ({"tune_lr": True, "tune_fraction": 0}, "--tune-fraction must be in (0, 1]"),
    ({"lr_factors": "1,3"}, "pass --tune-lr too"),
])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(LoralabError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        plan_compare(output=tmp_path, **kwargs)


def test_sweep_takes_variants_and_refuses_lrs_with_tune_lr(tmp_path):
    plan = plan_sweep(methods="dora,lora-plus", ranks="2,4", baselines="none", output=tmp_path)
    assert [r.name for r in plan.runs][:2] == ["dora-r2-a4-attention", "dora-r4-a8-attention"]
    assert plan.configs["lora-plus-r2-a4-attention"].lora_plus_ratio == 16.0
    with pytest.raises(LoralabError, match="--lrs fixes them"):
        plan_sweep(lrs="1e-4", tune_lr=True, output=tmp_path)


def test_search_plan_runs_each_method_at_its_own_rates_on_a_fraction(tmp_path):
    plan = plan_compare(methods="full,lora", ranks="4", output=tmp_path, tune_lr=True,
                        train_args=["--max-steps", "40"])
    search = search_plan(plan)
    assert search.output == tmp_path / "lr-search"
    rates = {r.name: search.configs[r.name].lr for r in search.runs}
    assert rates == pytest.approx({"full-x0.333": 2e-5 / 3, "full-x1": 2e-5, "full-x3": 6e-5,
                                   "lora-r4-x0.333": 1e-3 / 3, "lora-r4-x1": 1e-3,
                                   "lora-r4-x3": 3e-3}, rel=1e-3)
    assert {c.max_steps for c in search.configs.values()} == {10}  # a quarter of 40
    assert all(not c.save_checkpoints for c in search.configs.values())
    assert plan.fingerprint() != plan_compare(methods="full,lora", ranks="4", output=tmp_path,
                                              train_args=["--max-steps", "40"]).fingerprint()


def _row(name, value, status="ok"):
    return {"run": name, "status": status, "eval": {"f1": value} if value is not None else {},
            "steps": 3}


def test_choose_takes_the_best_score_and_keeps_the_default_on_ties_or_failure(tmp_path):
    plan = plan_compare(methods="full,head,lora", ranks="4", output=tmp_path, tune_lr=True)
    search = search_plan(plan)
    rows = [_row(candidate_name("full", f), v) for f, v in zip((1 / 3, 1, 3), (0.5, 0.6, 0.7))]
    rows += [_row(candidate_name("head", f), 0.8) for f in (1 / 3, 1, 3)]  # a tie: default
    rows += [_row(candidate_name("lora-r4", f), None, "failed") for f in (1 / 3, 1, 3)]
    chosen = choose(plan, search, rows)
    assert chosen["full"]["best_lr"] == pytest.approx(6e-5)
    assert chosen["head"]["best_lr"] == pytest.approx(plan.configs["head"].lr)
    assert chosen["lora-r4"]["best_lr"] == plan.configs["lora-r4"].lr
    assert [c["value"] for c in chosen["full"]["candidates"]] == [0.5, 0.6, 0.7]


def test_report_shows_the_search_and_variant_costs():
    rows = [F.row("lora-r8", method="lora", rank=8, trainable=1000, seconds=10.0, quality=0.8),
            F.row("dora-r8", method="lora", rank=8, trainable=1100, seconds=13.0, quality=0.82)]
    rows[0]["spec"]["variant"], rows[1]["spec"]["variant"] = "lora", "dora"
    search = {"dora-r8": {"metric": "f1", "split": "eval", "higher_is_better": True,
                          "default_lr": 1e-3, "best_lr": 3e-3, "candidates": [
                              {"lr": 3.3e-4, "factor": 0.333, "value": 0.7},
                              {"lr": 1e-3, "factor": 1.0, "value": 0.75},
                              {"lr": 3e-3, "factor": 3.0, "value": 0.8}]}}
    page = build_report(rows, {"title": "t", "lr_search": search})
    assert "data-chart='lr-dora-r8'" in page and "Learning-rate search" in page
    assert "tuned: best of 3 (default 0.001)" in page
    assert "Variants against plain LoRA" in page and "1.3×" in page  # DoRA's time vs LoRA
    assert ">DoRA r=8<" in page.replace("<br>", "<")


@pytest.mark.slow  # three training processes (two search runs, one final run)
def test_compare_tune_lr_end_to_end(tmp_path_factory, tmp_path):
    from train_support import class_rows, save_tiny, write_csv

    root = tmp_path_factory.mktemp("tune")
    bert, csv = save_tiny(root, "bert"), write_csv(root / "t.csv", class_rows(60))
    out = tmp_path / "cmp"
    assert cli("compare", "--model", bert, "--data", csv, "--methods", "dora",
               "--ranks", "2", "--tune-lr", "--lr-factors", "0.1,10", "--tune-fraction", "0.5",
               "--output", out, *FAST) == 0
    data = json.loads((out / "results.json").read_text())
    search = data["lr_search"]
    assert set(search) == {"dora-r2"}
    for row in data["runs"]:
        entry = search[row["run"]]
        assert row["lr"] == pytest.approx(entry["best_lr"])  # trained at the chosen rate
        assert {c["factor"] for c in entry["candidates"]} == {0.1, 10.0}
        assert all(c["status"] == "ok" for c in entry["candidates"])
    assert data["runs"][0]["spec"]["variant"] == "dora"
    assert (out / "lr-search" / "results.json").is_file()
    page = (out / "report.html").read_text()
    assert "data-chart='lr-dora-r2'" in page and "tuned: best of 2" in page
    assert "--tune-lr" in data["command"]
