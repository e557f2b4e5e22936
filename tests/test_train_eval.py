"""`loralab eval` reproduces the run's own test metrics from the saved files."""

from __future__ import annotations

import json

import pytest
from conftest import cli
from train_support import (
    class_rows,
    save_tiny,
    sft_records,
    write_csv,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


def eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli("eval", *args, "--json") == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_eval_matches_run_test_metrics(root, tmp_path, capsys, method):
    model = save_tiny(root, "bert")
    train = write_csv(tmp_path / "train.csv", class_rows(90, seed=1))
    test = write_csv(tmp_path / "test.csv", class_rows(24, seed=2))
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", train, "--test-data", test, "--output", out,
               "--method", method, "--epochs", 2, "--lr", 0.01, "--quiet") == 0
    run = json.loads((out / "metrics.json").read_text())
    if method == "full":
        result = eval_json(capsys, "--model", out / "model", "--data", test)
    else:
        result = eval_json(capsys, "--model", model, "--adapter", out / "adapter", "--data", test)
    got = result["metrics"]
    assert result["task"] == "classify" and result["examples"] == 24
    for key in ("accuracy", "f1", "precision", "recall"):
        assert got[key] == pytest.approx(run["test"][key], abs=1e-9)
    assert got["loss"] == pytest.approx(run["test"]["loss"], rel=1e-4)
    assert got["confusion_matrix"] == run["test"]["confusion_matrix"]


def test_eval_sft_and_plain_text(root, tmp_path, capsys):
    model = save_tiny(root, "llama")
    data = write_jsonl(tmp_path / "s.jsonl", sft_records(40))
    test = write_jsonl(tmp_path / "t.jsonl", sft_records(10, seed=5))
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", data, "--test-data", test, "--output", out,
               "--epochs", 2, "--lr", 0.01, "--quiet") == 0
    run = json.loads((out / "metrics.json").read_text())
    got = eval_json(capsys, "--model", model, "--adapter", out / "adapter", "--data", test)
    assert got["task"] == "sft"
    assert got["metrics"]["loss"] == pytest.approx(run["test"]["loss"], rel=1e-4)
    text = tmp_path / "prose.txt"
    text.write_text("hello world the package was late\nplease help my login is broken\n")
    ppl = eval_json(capsys, "--model", model, "--adapter", out / "adapter", "--data", text)
    assert ppl["kind"] == "text" and ppl["metrics"]["perplexity"] > 1


def test_eval_refuses_mismatched_data(root, tmp_path, capsys):
    model = save_tiny(root, "bert")
    text = tmp_path / "prose.txt"
    text.write_text("just prose\n")
    assert cli("eval", "--model", model, "--data", text) == 2
    assert "classifier" in capsys.readouterr().err
    assert cli("eval", "--model", model, "--data", tmp_path / "missing.csv") == 2
    assert "not found" in capsys.readouterr().err
