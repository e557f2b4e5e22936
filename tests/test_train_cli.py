"""`loralab train` end to end on tiny models: every method x task, artifacts,
falling loss, head-only, best checkpoint, determinism, peft compatibility."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli
from train_support import (
    class_rows,
    save_tiny,
    sft_records,
    write_csv,
    write_jsonl,
)

RUN_KEYS = {"method", "task", "model", "rank", "alpha", "targets", "trainable_params",
            "total_params", "trainable_percent", "train_seconds", "train_tokens",
            "tokens_per_second", "steps", "epochs", "peak_memory", "eval", "test",
            "artifact_bytes", "loss_curve"}




pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: save_tiny(root, k) for k in ("bert", "gpt2", "llama")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"classify": write_csv(root / "tickets.csv", class_rows(150)),
            "sft": write_jsonl(root / "sft.jsonl", sft_records(60))}


def train(models, data, out, method, task="classify", kind=None, *extra) -> dict:
    kind = kind or ("bert" if task == "classify" else "gpt2")
    lr = {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2, "head": 3e-2}[method]
    # random tiny backbones learn slowly through attention-only adapters: all-linear
    code = cli("train", "--model", models[kind], "--data", data[task], "--task", task,
               "--method", method, "--output", out, "--epochs", 4 if task == "classify" else 8,
               "--batch-size", 8, "--lr", lr, "--rank", 4, "--targets", "all-linear",
               "--quiet", *extra)
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


CASES = [("classify", m, "bert") for m in ("full", "lora", "qlora", "head")] + [
    ("sft", "full", "gpt2"), ("sft", "lora", "gpt2"), ("sft", "lora", "llama"),
    ("sft", "qlora", "llama")]


@pytest.mark.parametrize("task,method,kind", CASES)
def test_every_method_and_task(models, data, tmp_path, task, method, kind):
    out = tmp_path / "run"
    m = train(models, data, out, method, task, kind)
    assert RUN_KEYS <= set(m)
    assert (m["method"], m["task"]) == (method, task)
    curve = [loss for _, loss in m["loss_curve"]]
    # the loss falls; LoRA on the tiny random GPT-2 learns little beyond token
    # frequencies (its curve levels off ~8 % below the first window's mean)
    assert sum(curve[-2:]) / 2 < 0.95 * curve[0], curve
    files = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.json", "log.jsonl"} <= files
    assert "checkpoint" not in files and "best" not in files  # cleaned after success
    if method == "full":
        assert (out / "model" / "config.json").exists()
        assert (out / "model" / "tokenizer.json").exists()
        assert m["trainable_params"] == m["total_params"]
    else:
        assert (out / "adapter" / "adapter_config.json").exists()
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        assert m["trainable_params"] < m["total_params"]
    if task == "classify":
        assert json.loads((out / "labels.json").read_text())["labels"] == [
            "billing", "shipping", "tech"]
        assert {"accuracy", "precision", "recall", "f1", "confusion_matrix"} <= set(m["test"])
    else:
        assert m["eval"]["perplexity"] == pytest.approx(math.exp(m["eval"]["loss"]),
                                                         rel=1e-5)
    tensors = m["peak_memory"]["tensors"]
    assert tensors["gradients_bytes"] > 0 and tensors["optimizer_bytes"] > 0
    assert m["peak_memory"]["peak_rss_bytes"] > tensors["weights_bytes"]
    # measured on CPU: the process before the model loaded (python, torch, the data);
    # a tiny model may add nothing above the high-water mark the process had already
    base = m["peak_memory"]["process_baseline_bytes"]
    assert 50 * 2**20 < base <= m["peak_memory"]["peak_rss_bytes"]
    assert m["peak_memory"]["mapped_checkpoint_bytes"] >= 0
    if method == "qlora":
        assert "nf4" in tensors["weights_by_dtype"]
    # Adam keeps two fp32 moments (+ a step count per tensor) per trainable
    # parameter, and nothing for frozen ones
    assert 8 * m["trainable_params"] <= tensors["optimizer_bytes"] <= (
        8 * m["trainable_params"] + 4 * 200)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps and {"step", "epoch", "loss", "lr", "tokens_per_second", "elapsed"} <= set(
        steps[0])
    assert any("eval" in r for r in log)


def test_head_only_trains_only_the_head(models, data, tmp_path):
    from safetensors.torch import load_file

    m = train(models, data, tmp_path / "run", "head")
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert weights and all(".classifier." in k for k in weights)
    assert m["trainable_params"] == 32 * 3 + 3  # hidden 32 x 3 classes + bias
    base = torch.load  # noqa: F841 - the base weights on disk are untouched:
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(models["bert"])
    original = load_file(str(models["bert"] / "model.safetensors"))
    for name, p in reloaded.named_parameters():
        if name in original:
            assert torch.equal(p, original[name])


def test_head_method_refused_for_sft(models, data, tmp_path, capsys):
    code = cli("train", "--model", models["gpt2"], "--data", data["sft"], "--method", "head",
               "--output", tmp_path / "run", "--quiet")
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit task 'sft'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_same_seed_same_run(models, data, tmp_path):
    a = train(models, data, tmp_path / "a", "lora", "classify", None, "--dropout", 0.1)
    b = train(models, data, tmp_path / "b", "lora", "classify", None, "--dropout", 0.1)
    assert a["loss_curve"] == b["loss_curve"]
    assert a["test"] == b["test"]


def test_best_checkpoint_is_restored(models, data, tmp_path):
    # a large lr makes eval F1 bounce, so the best evaluation is not the last
    m = train(models, data, tmp_path / "run", "full", "classify", None,
              "--eval-every", 2, "--lr", 0.02, "--epochs", 3)
    f1s = {step: ev["f1"] for step, ev in m["evals"]}
    best_step = max(f1s, key=lambda s: (f1s[s], -s))
    assert m["best_step"] == best_step
    assert m["eval"]["f1"] == pytest.approx(f1s[best_step])
    assert best_step != m["steps"], "setup should make the last evaluation not the best"


@pytest.mark.parametrize("method", ["lora", "head"])
def test_adapter_loads_in_peft_with_equal_logits(models, data, tmp_path, method):
    """Head-only adapters too: they adapt no layer, only the saved head."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loralab.lora import load_adapter

    out = tmp_path / "run"
    train(models, data, out, method)
    labels = json.loads((out / "labels.json").read_text())["labels"]
    tok = AutoTokenizer.from_pretrained(models["bert"])
    batch = tok(["invoice error please", "parcel late today"], return_tensors="pt",
                padding=True)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            models["bert"], num_labels=len(labels)).eval()

    peft_model = PeftModel.from_pretrained(base(), out / "adapter").eval()
    ours = load_adapter(base(), out / "adapter").eval()
    with torch.no_grad():
        a = peft_model(**batch).logits
        b = ours(**batch).logits
    # each base() draws a fresh random head: equal logits mean both loaded the saved one
    assert torch.allclose(a, b, atol=1e-5)


def test_yaml_config_and_overrides(models, data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {models['bert']}\ndata: {data['classify']}\nmethod: lora\n"
                   f"rank: 2\nepochs: 1\nquiet: true\n")
    out = tmp_path / "run"
    assert cli("train", cfg, "rank=3", f"output={out}", "--lr", "0.01") == 0
    m = json.loads((out / "metrics.json").read_text())
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert m["rank"] == 3 and saved["rank"] == 3 and saved["lr"] == 0.01
    assert saved["alpha"] == 6.0 and saved["task"] == "classify"


def test_truncated_rows_are_counted(models, tmp_path):
    rows = class_rows(60)
    rows += [(" ".join(["invoice"] * 80), "billing")] * 2
    path = write_csv(tmp_path / "long.csv", rows)
    out = tmp_path / "run"
    assert cli("train", "--model", models["bert"], "--data", path, "--output", out,
               "--max-length", 32, "--epochs", 1, "--quiet") == 0
    log = (out / "log.jsonl").read_text()
    assert "truncated" in log
    assert json.loads((out / "metrics.json").read_text())["data"]["truncated_rows"] >= 1


def test_gradient_checkpointing_gives_the_same_run(models, data, tmp_path):
    plain = train(models, data, tmp_path / "a", "lora", "sft", "llama", "--epochs", 2)
    ckpt = train(models, data, tmp_path / "b", "lora", "sft", "llama", "--epochs", 2,
                 "--gradient-checkpointing")
    for (s1, l1), (s2, l2) in zip(plain["loss_curve"], ckpt["loss_curve"]):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)


def test_forgetting_on_general_text(models, data, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("the package was late again today\nmy login is broken please help\n" * 20)
    m = train(models, data, tmp_path / "run", "full", "sft", "gpt2", "--general-text", text)
    f = m["forgetting"]
    assert f["before_ppl"] > 1 and f["after_ppl"] > 1
    assert f["delta"] == pytest.approx(f["after_ppl"] - f["before_ppl"])
    assert f["percent"] == pytest.approx(100 * f["delta"] / f["before_ppl"])


def test_sparse_embedding_gradients_train_the_same_model(models, data, tmp_path, monkeypatch):
    """Full fine-tuning on CPU accumulates the word-embedding gradient sparsely
    and makes it dense once per step: same weights as dense accumulation."""
    from safetensors.torch import load_file

    from loralab.train import loop

    used = []
    real = loop._sparse_embeddings
    monkeypatch.setattr(loop, "_sparse_embeddings", lambda *a: used.append(real(*a)) or used[-1])
    train(models, data, tmp_path / "sparse", "full", "classify", None, "--grad-accum", 2)
    assert used and used[0], "the word embedding should get sparse gradients"
    monkeypatch.setattr(loop, "_sparse_embeddings", lambda *a: [])
    train(models, data, tmp_path / "dense", "full", "classify", None, "--grad-accum", 2)
    a = load_file(tmp_path / "sparse" / "model" / "model.safetensors")
    b = load_file(tmp_path / "dense" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    # attention key biases get no gradient in exact arithmetic (softmax ignores a
    # shift shared by all keys), so AdamW amplifies rounding noise there: skip them
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a
           if not k.endswith("key.bias") and not torch.allclose(a[k], b[k], atol=1e-5)}
    assert not bad, bad
