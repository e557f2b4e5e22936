"""Bad input to `loralab train`: one line naming the problem and the fix,
exit code 2, and nothing written."""

from __future__ import annotations

import pytest
from conftest import cli
from train_support import class_rows, save_tiny, write_csv, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m"), "bert")


def refused(capsys, out, *args) -> str:
    code = cli("train", "--output", out, "--quiet", *args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists(), "nothing may be written for bad input"
    return err


def test_missing_file(bert, tmp_path, capsys):
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", tmp_path / "nope.csv")
    assert "not found" in err


def test_empty_file(bert, tmp_path, capsys):
    (tmp_path / "e.csv").write_text("")
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", tmp_path / "e.csv")
    assert "empty" in err


def test_missing_column_lists_columns(bert, tmp_path, capsys):
    path = write_csv(tmp_path / "d.csv", class_rows(20), header=("email_text", "label"))
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", path)
    assert "'email_text'" in err and "--text-column" in err


def test_label_only_in_test(bert, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", class_rows(30))
    test = write_csv(tmp_path / "test.csv", class_rows(6) + [("invoice late", "refunds")])
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", train, "--test-data", test)
    assert "'refunds'" in err and "only in the test" in err


def test_non_utf8_reports_line(bert, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\nhello there,a\ncaf\xe9 au lait,b\n")
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", path)
    assert "not UTF-8" in err and "line 3" in err


def test_sft_record_without_response(bert, tmp_path, capsys):
    # one record without a response is skipped (counted in the log); none left: refused
    path = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "say hi", "output": " "},
                                              {"instruction": "say bye", "output": ""}])
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", path)
    assert "no response to learn in any record" in err


def test_chat_record_must_end_with_assistant(bert, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", path)
    assert "no response" in err


def test_single_class(bert, tmp_path, capsys):
    path = write_csv(tmp_path / "one.csv", [("invoice please", "billing")] * 20)
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", path)
    assert "2 or more" in err


@pytest.mark.parametrize("args,needle", [
    (("colour=blue",), "unknown setting 'colour'"),
    (("rank=abc",), "bad value for rank"),
    (("rank=0",), "rank must be a positive integer"),
    (("--method", "qlora", "--task", "sft", "scheduler=wavy"), "unknown scheduler"),
    (("notes.txt",), "unexpected argument"),
])
def test_bad_settings(bert, tmp_path, capsys, args, needle):
    data = write_csv(tmp_path / "d.csv", class_rows(20))
    err = refused(capsys, tmp_path / "o", "--model", bert, "--data", data, *args)
    assert needle in err


def test_bad_yaml(bert, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: [unclosed\n")
    err = refused(capsys, tmp_path / "o", cfg)
    assert "not valid YAML" in err


def test_output_holding_a_different_run(bert, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", class_rows(40))
    out = tmp_path / "run"
    base = ("train", "--model", bert, "--data", data, "--output", out, "--epochs", 1, "--quiet")
    assert cli(*base) == 0
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert cli(*base, "--rank", 2) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "rank" in err and "--overwrite" in err
    assert (out / "metrics.json").read_bytes() == before  # untouched
    assert cli(*base) == 2  # the same finished run: also refused
    assert "finished" in capsys.readouterr().err
    assert cli(*base, "--rank", 2, "--overwrite") == 0
    assert '"rank": 2' in (out / "metrics.json").read_text()


def test_not_empty_dir_without_run(bert, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", class_rows(20))
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli("train", "--model", bert, "--data", data, "--output", out, "--quiet") == 2
    assert "holds no loralab run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_train_test_overlap_warns(bert, tmp_path, capsys):
    rows = class_rows(30)
    train = write_csv(tmp_path / "train.csv", rows)
    test = write_csv(tmp_path / "test.csv", rows[:9])
    out = tmp_path / "o"
    assert cli("train", "--model", bert, "--data", train, "--test-data", test,
               "--output", out, "--epochs", 1, "--quiet") == 0
    err = capsys.readouterr().err
    assert "9 of 9 test texts also appear in the training data" in err
