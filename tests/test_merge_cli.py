"""`loralab merge` and `loralab targets` end to end on tiny models."""

import json

import pytest
import torch
from conftest import cli
from peft import LoraConfig, get_peft_model
from tiny_models import BUILDERS, randomize_adapters
from train_support import minilm_tokenizer, tiny_llama_dir
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from loralab.lora import LoRAConfig, inject_lora, save_adapter
from loralab.lora.quant import quantize_model_4bit


@pytest.fixture
def llama_dir(tmp_path):
    return tiny_llama_dir(tmp_path, name="base", context=128)


def test_peft_adapter_merges_to_match_peft_merge(llama_dir, tmp_path, capsys):
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft_model = get_peft_model(base, LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(llama_dir)
    cfg_path.write_text(json.dumps(cfg))
    peft_merged = peft_model.merge_and_unload().eval()
    main_args = ["merge", "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged")]
    assert cli(*main_args) == 0
    out = capsys.readouterr().out
    assert "max |logit(merged) - logit(adapter)|" in out
    assert float(out.split("= ")[1].split()[0]) < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok(["hello world, a test"], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (merged(ids).logits - peft_merged(ids).logits).abs().max()
    assert diff <= 1e-5
    assert not any("lora" in k for k in merged.state_dict())
    assert cli(*main_args) == 2  # refuses to overwrite


def test_classifier_adapter_merges_with_head(tmp_path):
    from transformers import BertForSequenceClassification

    tiny = BUILDERS["bert"](num_labels=2)
    cfg = tiny.config
    cfg.vocab_size = 30522
    base_dir = minilm_tokenizer(tmp_path / "base")
    BertForSequenceClassification(cfg).save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    inject_lora(model, LoRAConfig(r=4, alpha=8, task="classify"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "run" / "adapter", base_model_name_or_path=str(base_dir))
    (tmp_path / "run" / "labels.json").write_text(json.dumps({"0": "ham", "1": "spam"}))
    assert cli("merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output",
              str(tmp_path / "merged")) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "ham", 1: "spam"}
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        assert (merged(ids).logits - model.eval()(ids).logits).abs().max() <= 1e-5


def test_qlora_adapter_merges_into_dequantized_base(llama_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    quantize_model_4bit(model)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model, std=0.05)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(llama_dir))
    meta = json.loads((tmp_path / "adapter" / "loralab.json").read_text())
    assert meta["quantized"] == "nf4"
    assert cli("merge", "--adapter", str(tmp_path / "adapter"), "--output",
              str(tmp_path / "merged")) == 0
    out = capsys.readouterr().out
    assert "dequantized" in out and float(out.split("= ")[1].split()[0]) < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        assert (merged(ids).logits - model.eval()(ids).logits).abs().max() < 1e-3


def test_bad_adapter_inputs_exit_2(tmp_path, capsys):
    assert cli("merge", "--adapter", tmp_path / "none", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_targets_json(capsys):
    assert cli("targets", "--model", "minilm", "--rank", "8", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    presets = {p["preset"]: p for p in data["presets"]}
    assert presets["attention"]["params"] == 24 * 8 * (384 + 384)
    assert any(g["name"].endswith("attention.self.query") and g["count"] == 6
               for g in data["linear"])
