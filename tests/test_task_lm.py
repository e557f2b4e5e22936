"""--task lm end to end on tiny GPT-2/Llama: packing with EOS between documents,
a falling loss, perplexity in metrics and `loralab eval`, compare with forgetting."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import cli
from train_support import WORDS, make_tokenizer, save_tiny, write_jsonl

from loralab.data.documents import paragraphs
from loralab.data.encode import encode_documents

pytestmark = pytest.mark.usefixtures("single_thread")


def corpus(n: int = 40, seed: int = 0) -> list[str]:
    """Documents in a small learnable language: a word, then the word repeated."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS[:12]) for _ in range(4)]
        docs.append(" ".join(f"{w} {w}" for w in words))
    return docs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "corpus.txt").write_text("\n\n".join(corpus()) + "\n", encoding="utf-8")
    (root / "general.txt").write_text("\n\n".join(corpus(12, seed=5)) + "\n", encoding="utf-8")
    write_jsonl(root / "text.jsonl", [{"text": d, "id": i} for i, d in enumerate(corpus())])
    return root


def test_packing_marks_document_boundaries_with_eos():
    tok = make_tokenizer("causal")
    docs = ["say word", "hello world twice", "list"]
    enc = encode_documents(tok, docs, max_length=3)
    flat = [t for block in enc.input_ids for t in block]
    eos = tok.eos_token_id
    words = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert flat == words[0] + [eos] + words[1] + [eos] + words[2] + [eos]
    assert [len(b) for b in enc.input_ids] == [3, 3, 3]  # 9 tokens, blocks of max_length
    assert len(encode_documents(tok, docs, max_length=4).input_ids) == 2  # a 1-token tail: no
    assert enc.labels == enc.input_ids  # loss on every token
    assert enc.meta == {"documents": 3, "tokens": len(flat)}


def test_paragraphs_are_documents_and_lines_without_blank_lines():
    assert paragraphs("a b\nc\n\n\nd\r\n \r\ne\n") == ["a b\nc", "d", "e"]
    assert paragraphs("one\ntwo\n") == ["one", "two"]  # WikiText-style: a line each


@pytest.mark.parametrize("kind, data, method, lr", [("gpt2", "corpus.txt", "full", 3e-3),
                                                   ("llama", "text.jsonl", "lora", 1e-2)])
def test_lm_trains_loss_falls_perplexity_and_eval(tmp_path, root, kind, data, method, lr,
                                                  capsys):
    model = save_tiny(tmp_path.parent, kind)
    out = tmp_path / "run"
    code = cli("train", "--model", model, "--data", root / data, "--method", method,
               "--output", out, "--epochs", 6, "--batch-size", 4, "--lr", lr, "--rank", 4,
               "--targets", "all-linear", "--max-length", 32, "--quiet")
    assert code == 0
    err = capsys.readouterr().err
    assert "lm data" in err and "EOS between documents" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "lm"  # told from the data: a .txt file, or text-only records
    curve = [loss for _, loss in m["loss_curve"]]
    assert curve[-1] < curve[0] - 0.3
    ppl = m["test"]["perplexity"]
    assert ppl == pytest.approx(math.exp(m["test"]["loss"])) and ppl < math.exp(curve[0])
    if method == "full":
        args = ["--model", out / "model"]
    else:
        assert json.loads((out / "adapter" / "loralab.json").read_text())["task"] == "lm"
        args = ["--model", model, "--adapter", out / "adapter"]
    capsys.readouterr()
    assert cli("eval", *args, "--data", root / data, "--max-length", 32, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "text" and res["metrics"]["perplexity"] < math.exp(curve[0])


def test_lm_forgetting_on_general_text(tmp_path, root):
    model = save_tiny(tmp_path.parent, "gpt2")
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--data", root / "corpus.txt", "--task", "lm",
               "--method", "full", "--output", out, "--max-steps", 4, "--batch-size", 4,
               "--lr", 3e-3, "--max-length", 32, "--general-text", root / "general.txt",
               "--quiet") == 0
    f = json.loads((out / "metrics.json").read_text())["forgetting"]
    assert f["before_ppl"] > 1 and f["after_ppl"] > 1
    assert f["delta"] == pytest.approx(f["after_ppl"] - f["before_ppl"])


@pytest.mark.slow
def test_compare_task_lm_measures_forgetting(tmp_path, root):
    model = save_tiny(tmp_path.parent, "llama")
    out = tmp_path / "cmp"
    assert cli("compare", "--model", model, "--data", root / "corpus.txt", "--task", "lm",
               "--methods", "lora", "--ranks", "2", "--general-text", root / "general.txt",
               "--output", out, "--max-steps", "3", "--max-length", "32",
               "--batch-size", "4") == 0
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["lora-r2"]
    for row in rows:
        assert row["task"] == "lm" and row["forgetting"]["before_ppl"] > 1
        assert row["eval"]["perplexity"] > 1
    assert not (out / "generations.jsonl").exists()
