"""Data as users have it: every file format and record shape, the task told from
the data, long prompts cut from the left, and each bad input refused with one
line (exit 2) that lists the fields found, nothing written."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import cli
from train_support import make_tokenizer, save_tiny, write_jsonl

from loralab.config import infer_task
from loralab.data.encode import IGNORE, encode_conversations
from loralab.data.instructions import read_sft
from loralab.data.tables import read_table
from loralab.errors import LoralabError

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = [("say hello", "hello"), ("repeat world", "world world"), ("list first", "first")]
EXPECTED = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in PAIRS]


def write(path, records):
    """``records`` in the format ``path``'s extension names (a dir: save_to_disk)."""
    fields = list(records[0])
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fields, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif path.suffix == ".jsonl":
        write_jsonl(path, records)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.json", "d.jsonl", "d.parquet", "d_dir"])
def test_every_format_reads_the_same_records(tmp_path, name):
    path = write(tmp_path / name, [{"prompt": p, "answer": r} for p, r in PAIRS])
    convs, mapping, _ = read_sft(str(path))
    assert convs == EXPECTED and (mapping.prompt, mapping.response) == ("prompt", "answer")
    assert infer_task(str(path)) == "sft"


SHAPES = {
    "messages": [{"messages": c} for c in EXPECTED],
    "sharegpt": [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
                 for p, r in PAIRS],
    "prompt_completion": [{"prompt": p, "completion": r} for p, r in PAIRS],
    "conversational_prompt_completion": [{"prompt": c[:1], "completion": c[1:]}
                                         for c in EXPECTED],
    "alpaca": [{"instruction": p, "input": "", "output": r} for p, r in PAIRS],
    "question_response": [{"question": p, "response": r, "id": 1} for p, r in PAIRS],
    "question_answer": [{"question": p, "answer": r} for p, r in PAIRS],
    "query_response": [{"query": p, "response": r} for p, r in PAIRS],
    "input_output": [{"input": p, "output": r} for p, r in PAIRS],
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_record_shape_is_detected(tmp_path, shape):
    path = write_jsonl(tmp_path / "d.jsonl", SHAPES[shape])
    assert infer_task(str(path)) == "sft"
    convs, mapping, _ = read_sft(str(path))
    assert convs == EXPECTED, mapping.describe()


def test_alpaca_input_and_a_system_field_join_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"system": "be brief", "instruction": "add", "input": "2 and 3", "output": "5"}])
    (conv,), mapping, _ = read_sft(str(path))
    assert conv == [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "add\n\n2 and 3"},
                    {"role": "assistant", "content": "5"}]
    assert "context 'input'" in mapping.describe()


def test_records_without_a_response_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SHAPES["alpaca"] + [
        {"instruction": "standardize the date", "input": "", "output": ""}])
    convs, _, skipped = read_sft(str(path))
    assert convs == EXPECTED and skipped == 1
    with pytest.raises(LoralabError, match="no response to learn in any record"):
        read_sft(str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": " "}])))


def test_fields_named_by_the_user(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": p, "a": r, "chat": c}
                                              for (p, r), c in zip(PAIRS, EXPECTED)])
    opts = {"prompt_field": "q", "response_field": "a"}
    assert infer_task(str(path), opts) == "sft"
    assert read_sft(str(path), opts)[0] == EXPECTED
    assert read_sft(str(path), {"messages_field": "chat"})[0] == EXPECTED


def test_task_from_the_data(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("plain prose, not a table\n\nanother paragraph\n")
    assert infer_task(str(text)) == "lm"
    assert infer_task(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "url": "u"}]))) == "lm"
    assert infer_task(str(write(tmp_path / "c.parquet", [{"text": "a", "label": "x"}]))) \
        == "classify"
    assert infer_task(str(write(tmp_path / "c.csv", [{"text": "a", "label": "x"}]))) == "classify"
    raw = tmp_path / "wiki.raw"  # no known extension: told by the content
    raw.write_text(" = Heading = \n Prose, with a comma .\n More prose .\n")
    sms = tmp_path / "SMSCollection"
    sms.write_text("ham\tok then\nspam\twin a prize, now\nham\tsee you\n")
    assert infer_task(str(raw)) == "lm" and infer_task(str(sms)) == "classify"
    with pytest.raises(LoralabError, match=r"fields \('foo', 'bar'\).*--task"):
        infer_task(str(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1, "bar": 2}])))


@pytest.mark.parametrize("name", ["t.parquet", "t_dir"])
def test_classification_tables_from_parquet_and_save_to_disk(tmp_path, name):
    path = write(tmp_path / name, [{"sentence": "good", "label": 1}, {"sentence": "bad",
                                                                     "label": 0}])
    t = read_table(str(path), text_column="sentence")
    assert t.texts == ["good", "bad"] and t.labels == ["1", "0"]


def test_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(
        [{"prompt": f"{s} {p}", "completion": r} for p, r in PAIRS]) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_sft(str(tmp_path / "dd"))[0][0][0]["content"] == "train say hello"
    assert read_sft(str(tmp_path / "dd"), {"data_split": "test"})[0][0][0]["content"] \
        == "test say hello"
    with pytest.raises(LoralabError, match="splits 'train', 'test', not 'dev'"):
        read_sft(str(tmp_path / "dd"), {"data_split": "dev"})


def test_long_prompt_is_cut_from_the_left_template_and_response_kept():
    tok = make_tokenizer("causal", chat=True)
    words = " ".join(f"say{i % 10}" for i in range(60)).replace("say", "")  # digits
    conv = [{"role": "user", "content": f"{words} repeat hello"},
            {"role": "assistant", "content": "hello"}]
    enc = encode_conversations(tok, [conv], max_length=16)
    assert enc.prompt_cut == 1 and len(enc) == 1
    ids, labels = enc.input_ids[0], enc.labels[0]
    text = tok.decode(ids)
    assert len(ids) <= 16 and text.startswith("<user>") and text.endswith("hello <eos>")
    assert "repeat hello <bot>" in text  # the end of the prompt is what is kept
    assert tok.decode([t for t in labels if t != IGNORE]) == "hello <eos>"
    assert len(encode_conversations(tok, [conv], 16, truncation="drop")) == 0  # the old rule


def test_sft_prompt_completion_trains_and_logs_the_mapping(tmp_path, capsys):
    model = save_tiny(tmp_path, "gpt2")
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"say {w}", "completion": w}
                                               for w in ("hello", "world", "list") * 8])
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", data, "--method", "lora", "--output", out,
               "--max-steps", 2, "--batch-size", 4, "--max-length", 32, "--quiet") == 0
    assert "prompt 'prompt', response 'completion'" in capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "sft" and m["data"]["fields"] == "prompt 'prompt', response 'completion'"
    log = (out / "log.jsonl").read_text()
    assert "response 'completion'" in log


# --- bad input: one line naming the problem and the fix, exit 2, nothing written -----------

def _bad(tmp_path, name, records):
    return write(tmp_path / name, records) if records is not None else tmp_path / name


BAD = [
    ("mapping names an absent field", "d.jsonl", [{"prompt": "a", "answer": "b"}],
     ["--prompt-field", "question"], "no field 'question'.*fields found: 'prompt', 'answer'"),
    ("a mapping left half-given", "d.jsonl", [{"q": "a", "b": "b"}],
     ["--prompt-field", "q"], "--response-field is needed too.*fields found: 'q', 'b'"),
    ("messages field absent", "d.jsonl", [{"prompt": "a", "answer": "b"}],
     ["--messages-field", "chat"], "no field 'chat'.*fields found: 'prompt', 'answer'"),
    ("a .txt file given to classify", "notes.txt", None, ["--task", "classify"],
     "plain text, not a classification table"),
    ("an empty Parquet file", "empty.parquet", "empty", [],
     "has no rows \\(columns: 'text', 'label'\\)"),
    ("fields that tell no task", "u.jsonl", [{"foo": 1, "bar": 2}], [],
     "cannot tell the task.*'foo', 'bar'.*--task"),
    ("--text-column given to sft", "d.jsonl", [{"prompt": "a", "completion": "b"}],
     ["--text-column", "body"], "--text-column does not apply to task 'sft'"),
    ("--label-column given to sft", "d.jsonl", [{"prompt": "a", "completion": "b"}],
     ["--label-column", "y"], "--label-column does not apply to task 'sft'"),
    ("sft data without a known shape", "d.jsonl", [{"foo": "a", "text": "b"}],
     ["--task", "sft"], "no instruction data: fields found: 'foo', 'text'"),
    ("a classify column that is absent", "d.parquet", [{"sentence": "a", "label": "x"}],
     ["--task", "classify"], "no text column 'text'; columns found: 'sentence', 'label'"),
    ("an lm text field that is absent", "d.jsonl", [{"body": "a"}], ["--task", "lm"],
     "no text field 'text' for --task lm; fields found: 'body'"),
    ("a dataset id with no network", None, None, [], "hub is\\s+unreachable"),
]


@pytest.mark.parametrize("case, name, records, extra, message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_one_line_exit_2(tmp_path, capsys, monkeypatch, case, name, records,
                                     extra, message):
    import re

    if name == "notes.txt":
        (tmp_path / name).write_text("plain prose\n\nmore prose\n")
        data = tmp_path / name
    elif records == "empty":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = tmp_path / name
        pq.write_table(pa.table({"text": pa.array([], pa.string()),
                                 "label": pa.array([], pa.string())}), data)
    elif name is None:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        data = "someone/some-dataset"
    else:
        data = _bad(tmp_path, name, records)
    out = tmp_path / "run"
    model = save_tiny(tmp_path.parent, "gpt2")
    capsys.readouterr()
    assert cli("train", "--model", model, "--data", data, "--output", out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()


def test_classify_trains_and_evaluates_on_parquet(tmp_path, capsys):
    from train_support import class_rows

    model = save_tiny(tmp_path, "bert")
    data = write(tmp_path / "t.parquet", [{"body": t, "label": lab} for t, lab in class_rows(60)])
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", data, "--text-column", "body",
               "--method", "lora", "--output", out, "--max-steps", 2, "--quiet") == 0
    assert json.loads((out / "metrics.json").read_text())["task"] == "classify"
    capsys.readouterr()
    assert cli("eval", "--model", model, "--adapter", out / "adapter", "--data", data,
               "--text-column", "body", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "classify" and res["examples"] == 60
