"""PEFT on-disk format: round trips with real peft both ways, heads, merge."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import BUILDERS, logits, randomize_adapters

from loralab.errors import LoralabError
from loralab.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    load_adapter,
    merge_and_unload,
    save_adapter,
)

CASES = [("bert", ["query", "value"]), ("gpt2", "attention"), ("llama", "all-linear"),
         ("qwen3", "attention")]


def _trained(arch, targets):
    model = BUILDERS[arch]()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=targets))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("arch,targets", CASES)
def test_loralab_adapter_loads_in_peft_with_same_logits(arch, targets, tmp_path):
    ids = torch.randint(0, 100, (2, 8))
    ours = _trained(arch, targets)
    expected = logits(ours, ids)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "tiny"
    peft_model = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ad").eval()
    assert (logits(peft_model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch,targets", CASES)
def test_peft_adapter_loads_in_loralab_with_same_logits(arch, targets, tmp_path):
    ids = torch.randint(0, 100, (2, 8))
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    peft_targets = targets
    if targets == "attention":
        peft_targets = (["c_attn", "attn.c_proj"] if arch == "gpt2" else
                        ["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(BUILDERS[arch](), LoraConfig(
        task_type=task, r=4, lora_alpha=8, target_modules=peft_targets,
        fan_in_fan_out=arch == "gpt2", init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "p")
    ours = load_adapter(BUILDERS[arch](), tmp_path / "p")
    assert (logits(ours, ids) - logits(peft_model, ids)).abs().max() <= 1e-5


def test_head_is_saved_and_restored(tmp_path):
    ids = torch.randint(0, 100, (2, 8))
    ours = BUILDERS["bert"]()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, task="classify"))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
    again = load_adapter(BUILDERS["bert"](), tmp_path / "ad")
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path / "ad").eval()
    assert (logits(peft_model, ids) - logits(ours, ids)).abs().max() <= 1e-5


def test_merge_and_unload_matches_peft_merge(tmp_path):
    ids = torch.randint(0, 100, (2, 8))
    peft_model = get_peft_model(BUILDERS["llama"](), LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
        init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "p")
    ours = load_adapter(BUILDERS["llama"](), tmp_path / "p")
    unmerged = logits(ours, ids)
    merged = merge_and_unload(ours)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert type(merged).__name__ == "LlamaForCausalLM"
    peft_merged = peft_model.merge_and_unload()
    assert (logits(merged, ids) - logits(peft_merged, ids)).abs().max() <= 1e-5
    assert (logits(merged, ids) - unmerged).abs().max() <= 1e-4


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    save_adapter(_trained("bert", ["query"]), tmp_path / "ad")
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3))
    with pytest.raises(LoralabError, match=r"module 'bert.encoder.layer.0.attention.self.query"
                                           r".*\(4, 32\).*\(4, 48\)"):
        load_adapter(other, tmp_path / "ad")


def test_adapter_for_a_different_architecture(tmp_path):
    save_adapter(_trained("llama", "attention"), tmp_path / "ad")
    with pytest.raises(LoralabError, match="does not fit this model"):
        load_adapter(BUILDERS["bert"](), tmp_path / "ad")


def test_missing_and_corrupt_files(tmp_path):
    save_adapter(_trained("bert", ["query"]), tmp_path / "ad")
    with pytest.raises(LoralabError, match="does not exist"):
        load_adapter(BUILDERS["bert"](), tmp_path / "nope")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(LoralabError, match="corrupt"):
        load_adapter(BUILDERS["bert"](), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").unlink()
    with pytest.raises(LoralabError, match="no adapter_config.json"):
        load_adapter(BUILDERS["bert"](), tmp_path / "ad")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = _trained("bert", ["query"])
    save_adapter(model, tmp_path / "ad")
    before = sorted(p.name for p in (tmp_path / "ad").iterdir())
    from loralab.lora import adapters

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapters, "atomic_write_json", boom)
    with pytest.raises(RuntimeError):
        save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_layers_the_checkpoint_lacked_are_saved_with_the_adapter(tmp_path):
    """DeBERTa-v2's pooler is not in a bare-backbone checkpoint: loaded as a
    classifier it starts random beside the head, so an adapter trains and saves
    both, and every later load answers the same (not a new random pooler)."""
    from tiny_models import save_arch

    from loralab.lora.adapters import load_base_and_adapter
    from loralab.models import load_model

    base = save_arch(tmp_path, "deberta-v2")
    model, tok = load_model(str(base), "classify", num_labels=2)
    assert set(model.loralab_fresh_modules) == {"classifier", "pooler.dense"}
    inject_lora(model, LoRAConfig(r=2, alpha=4, task="classify"))
    assert set(model.loralab_adapters["default"]["modules_to_save"]) == {"classifier",
                                                                      "pooler.dense"}
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(base))
    batch = tok(["an invoice error", "the app crashes"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        again = [load_base_and_adapter(tmp_path / "ad")[0](**batch).logits for _ in range(2)]
    for out in again:
        assert torch.allclose(out, expected, atol=1e-6)
