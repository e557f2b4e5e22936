"""Adapters ``loralab serve`` must run exactly as the other commands run them:
a RoBERTa classifier, whose head is a block (``classifier.dense`` then
``classifier.out_proj``), answers the probabilities of the one "base +
adapter" loader and the labels ``loralab eval`` scores; a QLoRA adapter runs
on the NF4 base it was trained on, and a float adapter is refused there.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from conftest import cli
from safetensors import safe_open
from tiny_models import randomize_adapters, save_arch
from train_support import build_adapters, class_rows, tiny_llama_dir, write_csv

from loralab.generation import SamplingParams, complete
from loralab.lora import LoRAConfig, inject_lora, save_adapter
from loralab.lora.adapters import load_base_and_adapter
from loralab.lora.base import is_4bit
from loralab.models import load_model
from loralab.serve.app import create_app
from loralab.serve.server import BackgroundServer, LoraServer, ServeConfig

pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = ("billing", "shipping", "tech")


def roberta_classifier(root):
    """A tiny RoBERTa with a LoRA classification adapter, head randomized."""
    model_dir = save_arch(root / "models", "roberta")
    model, _ = load_model(str(model_dir), "classify", id2label=dict(enumerate(LABELS)))
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention", task="classify"))
    randomize_adapters(model, "default", seed=3, std=0.5)
    run = root / "run"
    save_adapter(model, run / "adapter", base_model_name_or_path=str(model_dir))
    (run / "labels.json").write_text(json.dumps({"labels": list(LABELS)}))
    return model_dir, run


def test_roberta_nested_head_answers_as_the_loader_and_eval(tmp_path, capsys):
    model_dir, run = roberta_classifier(tmp_path)
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        heads = {k for k in f.keys() if ".classifier." in k}  # noqa: SIM118
    assert any(".dense." in k for k in heads) and any(".out_proj." in k for k in heads)
    rows = class_rows(12, seed=4)
    texts = [t for t, _ in rows]
    server = LoraServer(ServeConfig(model=str(model_dir), adapters={"clf": str(run)}, threads=1))
    with BackgroundServer(create_app(server)) as bg:
        card = httpx.get(bg.url + "/v1/models").json()["data"][1]
        r = httpx.post(bg.url + "/v1/classify", json={"model": "clf", "input": texts}, timeout=60)
    assert card["labels"] == list(LABELS)
    assert r.status_code == 200, r.text
    served = r.json()["data"]

    model, tok, info = load_base_and_adapter(run)  # what eval, merge and generate load
    assert info["labels"] == list(LABELS)
    for text, row in zip(texts, served):
        with torch.no_grad():
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits, -1)[0]
        assert torch.allclose(torch.tensor(list(row["probabilities"].values())), probs,
                              atol=1e-5)
        assert row["label"] == LABELS[int(probs.argmax())]

    data = write_csv(tmp_path / "eval.csv", rows)
    capsys.readouterr()
    assert cli("eval", "--model", model_dir, "--adapter", run, "--data", data, "--json") == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    golds = [label for _, label in rows]
    accuracy = sum(row["label"] == g for row, g in zip(served, golds)) / len(rows)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    for label in LABELS:  # the same answers, class by class
        predicted = sum(row["label"] == label for row in served)
        hits = sum(row["label"] == g == label for row, g in zip(served, golds))
        precision = hits / predicted if predicted else 0.0
        assert metrics["per_class"][label]["precision"] == pytest.approx(precision)


def test_qlora_adapter_runs_on_the_nf4_base(tmp_path):
    model_dir = tiny_llama_dir(tmp_path)
    model, _ = load_model(str(model_dir), "sft", quantize_4bit=True)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention", task="sft"))
    randomize_adapters(model, "default", seed=7, std=0.5)
    run = tmp_path / "runs" / "q"
    save_adapter(model, run / "adapter", base_model_name_or_path=str(model_dir))
    assert json.loads((run / "adapter" / "loralab.json").read_text())["quantized"] == "nf4"
    floating = build_adapters(model_dir, tmp_path / "runs", ["f"])["f"]

    server = LoraServer(ServeConfig(model=str(model_dir), adapters={"q": str(run)},
                                    adapter_root=str(tmp_path / "runs"), threads=1))
    assert server.served.quantized
    assert any(is_4bit(m) for m in server.served.model.modules())
    offline, tok, info = load_base_and_adapter(run)
    assert info["quantized"]
    prompt = "the quick brown fox"
    expected = complete(offline, tok, prompt, SamplingParams(max_tokens=12)).text
    with BackgroundServer(create_app(server)) as bg:
        r = httpx.post(bg.url + "/v1/completions", timeout=60, json={
            "model": "q", "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        r = httpx.post(bg.url + "/v1/adapters", json={"name": "f", "path": str(floating)})
        assert r.status_code == 400 and "NF4" in r.json()["error"]["message"]
