"""Data loading, splitting, prompts, tokenization and batching."""

from __future__ import annotations

import json

import pytest
import torch
from train_support import CHAT_TEMPLATE, class_rows, make_tokenizer, write_csv

from loralab.data.batching import collate, count_targets, plan_batches, plan_steps, shard
from loralab.data.encode import IGNORE, encode_classification, encode_conversations
from loralab.data.instructions import read_conversations
from loralab.data.prompts import build_chat_prompt, build_prompt, split_instruction
from loralab.data.splits import LabelMap, count_overlap, stratified_split
from loralab.data.tables import Table, read_table, sniff_delimiter
from loralab.errors import LoralabError


def test_tsv_with_quotes_keeps_every_row(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('label\ttext\nham\tsay "hi\nspam\twin "big" now\nham\tok\n')
    t = read_table(path)
    assert t.texts == ['say "hi', 'win "big" now', "ok"] and t.labels == ["ham", "spam", "ham"]


def test_csv_semicolon_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("label;text\na;one, two\nb;three\n")
    assert sniff_delimiter((tmp_path / "d.csv").read_text(), ".csv") == ";"
    assert read_table(tmp_path / "d.csv").texts == ["one, two", "three"]
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    t = read_table(tmp_path / "d.jsonl")
    assert t.labels == ["1", "0"]


def test_headerless_file_by_column_index(tmp_path):
    path = tmp_path / "SMS"
    path.write_text("ham\tGo until jurong point, crazy.. Available only in bugis\n"
                    "spam\tFree entry in 2 a wkly comp to win FA Cup final tkts\n")
    t = read_table(path, text_column="1", label_column="0")
    assert t.labels == ["ham", "spam"] and t.texts[1].startswith("Free entry")
    with pytest.raises(LoralabError, match="columns found: '0', '1'"):
        read_table(path)


def test_rows_without_text_or_label_are_skipped(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a b", "x"), ("", "x"), ("c d", "")])
    t = read_table(path)
    assert t.texts == ["a b"] and t.skipped == 2


def test_label_map_orders_numbers_numerically():
    assert LabelMap.from_labels(["10", "2", "1"]).labels == ["1", "2", "10"]
    lm = LabelMap.from_labels(["spam", "ham"])
    assert lm.labels == ["ham", "spam"] and lm.encode(["spam"]) == [1]
    assert LabelMap.from_json(json.loads(json.dumps(lm.to_json()))).labels == lm.labels


def test_stratified_split_is_seeded_and_keeps_classes():
    labels = [lab for _, lab in class_rows(100)]
    a = stratified_split(labels, (0.1, 0.1), seed=3)
    assert a == stratified_split(labels, (0.1, 0.1), seed=3)
    assert a != stratified_split(labels, (0.1, 0.1), seed=4)
    train, ev, te = a
    assert sorted(train + ev + te) == list(range(100))
    counts = [labels.count(c) for c in set(labels)]
    assert len(ev) == len(te) == sum(round(n * 0.1) for n in counts)  # 10 % of each class
    for part in a:
        assert {labels[i] for i in part} == set(labels)


def test_overlap_counts_normalised_duplicates():
    train = Table(["Hello  World", "b"], ["x", "y"], "t")
    test = Table(["hello world", "c"], ["x", "y"], "u")
    assert count_overlap(train, test) == (1, 2)


def test_prompts_alpaca_without_template():
    tok = make_tokenizer("causal")
    p = build_prompt(tok, "Add", "2 and 3")
    assert "### Instruction:\nAdd" in p and "### Input:\n2 and 3" in p
    assert p.endswith("### Response:\n")
    assert "### Input" not in build_prompt(tok, "Say hi")
    prompt, response = split_instruction(tok, "Say hi", "", "hi")
    assert prompt == build_prompt(tok, "Say hi") and response == "hi<eos>"


def test_prompts_chat_template():
    tok = make_tokenizer("causal", chat=True)
    assert tok.chat_template == CHAT_TEMPLATE
    assert build_prompt(tok, "hello", "world") == "<user> hello\n\nworld <bot> "
    msgs = [{"role": "user", "content": "hi"}]
    assert build_chat_prompt(tok, msgs) == "<user> hi <bot> "
    prompt, response = split_instruction(tok, "hi", "", "hello")
    assert prompt == "<user> hi <bot> " and response == "hello <eos> "


def test_sft_labels_mask_the_prompt(tmp_path):
    tok = make_tokenizer("causal", chat=True)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "say hello"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    enc = encode_conversations(tok, read_conversations(path), max_length=64)
    ids, labels = enc.input_ids[0], enc.labels[0]
    prompt_len = len(tok("<user> say hello <bot> ", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tok.decode(ids[prompt_len:]) == "hello <eos>"


def test_sft_truncation_counts_and_drops():
    tok = make_tokenizer("causal")
    conv = [{"role": "user", "content": "hello " * 40},
            {"role": "assistant", "content": "world"}]
    enc = encode_conversations(tok, [conv], max_length=16, truncation="drop")
    assert enc.truncated == 1 and enc.dropped == 1 and len(enc) == 0
    enc = encode_conversations(tok, [conv], max_length=16)  # prompt cut from the left
    assert enc.truncated == enc.prompt_cut == 1 and enc.dropped == 0 and len(enc) == 1
    text = tok.decode(enc.input_ids[0])
    assert len(enc.input_ids[0]) <= 16 and text.endswith("world <eos>")
    assert text.count("hello") < 40


def test_classification_truncation_keeps_special_tokens():
    tok = make_tokenizer("bert")
    enc = encode_classification(tok, ["invoice " * 50, "error"], [0, 1], max_length=8)
    assert enc.truncated == 1 and len(enc.input_ids[0]) == 8
    assert enc.input_ids[0][0] == tok.cls_token_id and enc.input_ids[0][-1] == tok.sep_token_id


def test_batch_plan_is_seeded_grouped_and_complete():
    lengths = [((i * 37) % 50) + 1 for i in range(200)]
    plan = plan_batches(lengths, 8, seed=1, epoch=0)
    assert plan == plan_batches(lengths, 8, seed=1, epoch=0)
    assert plan != plan_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(200))
    # grouping: padded tokens stay far below padding each random batch
    padded = sum(max(lengths[i] for i in b) * len(b) for b in plan)
    random_plan = plan_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    padded_random = sum(max(lengths[i] for i in b) * len(b) for b in random_plan)
    assert padded < 0.75 * padded_random


def test_steps_are_grouped_by_length_as_wholes():
    lengths = [((i * 37) % 50) + 1 for i in range(2003)]
    steps = plan_steps(lengths, 8, 4, seed=1, epoch=0)
    assert steps == plan_steps(lengths, 8, 4, seed=1, epoch=0)
    assert steps != plan_steps(lengths, 8, 4, seed=1, epoch=1)
    assert len(steps) == 63 and sorted(i for s in steps for b in s for i in b) == list(range(2003))
    sizes = sorted(([len(b) for b in s] for s in steps), key=len)
    assert sizes == [[8, 8, 3]] + [[8] * 4] * 62  # the last pool's remainder: one shorter step
    # the rows of a step have similar lengths: padding the step as one pass costs
    # far less than for steps of length-grouped batches in random order
    batches = plan_batches(lengths, 8, seed=1, epoch=0)
    old = [batches[i:i + 4] for i in range(0, len(batches), 4)]

    def padded(plan):
        return sum(max(lengths[i] for b in s for i in b) * sum(map(len, s)) for s in plan)
    assert padded(steps) < 0.8 * padded(old)
    # one batch per step, or no grouping: the plan is plan_batches'
    assert plan_steps(lengths, 8, 1, 1, 0) == [[b] for b in batches]
    flat = plan_batches(lengths, 32, 1, 0, group_by_length=False)
    assert plan_steps(lengths, 8, 4, 1, 0, False) == [
        [g[i:i + 8] for i in range(0, len(g), 8)] for g in flat]


def test_shard_splits_a_global_batch_evenly():
    batch = list(range(7))
    parts = [shard(batch, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]


def test_collate_pads_to_the_longest_row():
    from loralab.data.encode import Encoded

    enc = Encoded([[5, 6, 7], [8]], [[IGNORE, 6, 7], [8]])
    batch = collate(enc, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert count_targets(enc, [0, 1]) == 2  # the first position predicts nothing
    cls = Encoded([[1, 2], [3]], [1, 0])
    assert collate(cls, [1, 0], pad_id=0)["labels"].dtype == torch.long
