"""Target matching, presets, freezing, heads, and the parameter report vs peft."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import BUILDERS, logits, randomize_adapters

from loralab.errors import LoralabError
from loralab.lora import (
    LoRAConfig,
    LoRALinear,
    ModulesToSave,
    adapter_routing,
    delete_adapter,
    find_targets,
    inject_lora,
    set_active_adapter,
    trainable_report,
)


def test_presets_per_architecture():
    bert = BUILDERS["bert"]()
    att = find_targets(bert, "attention")
    assert len(att) == 2 * 4 and all(n.split(".")[-1] in ("query", "key", "value", "dense")
                                     for n in att)
    assert not any("intermediate" in n for n in att)
    all_lin = find_targets(bert, "all-linear")
    assert "classifier" not in all_lin and "bert.pooler.dense" in all_lin
    llama = BUILDERS["llama"]()
    assert len(find_targets(llama, "attention")) == 8
    assert len(find_targets(llama, "all-linear")) == 14 and "lm_head" not in find_targets(
        llama, "all-linear")
    assert find_targets(BUILDERS["gpt2"](), "attention") == [
        f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]


def test_suffix_regex_and_no_match_error():
    llama = BUILDERS["llama"]()
    assert len(find_targets(llama, "q_proj,v_proj")) == 4
    assert find_targets(llama, r"re:model\.layers\.0\.mlp\..*_proj") == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj"]
    with pytest.raises(LoralabError, match="match no linear layer.*q_proj"):
        find_targets(llama, ["nope"])


def test_everything_else_frozen_and_head_trainable():
    model = BUILDERS["bert"]()
    inject_lora(model, LoRAConfig(r=4, alpha=8, task="classify"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(n.startswith("classifier.modules_to_save.default") for n in trainable)
    assert isinstance(model.classifier, ModulesToSave)


@pytest.mark.parametrize("arch,targets", [("bert", ["query", "value"]),
                                          ("llama", "all-linear"), ("gpt2", ["c_attn"]),
                                          ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_parameter_report_matches_peft(arch, targets):
    ours = BUILDERS[arch]()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, targets=targets))
    rep = trainable_report(ours)
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    peft_model = get_peft_model(BUILDERS[arch](), LoraConfig(
        task_type=task, r=4, lora_alpha=8, target_modules=targets,
        fan_in_fan_out=arch == "gpt2"))
    assert (rep["trainable"], rep["total"]) == peft_model.get_nb_trainable_parameters()
    lora_params = sum(row["params"] for row in rep["rows"])
    assert lora_params == sum(p.numel() for n, p in ours.named_parameters() if ".lora_" in n)
    for row in rep["rows"]:
        assert row["per_layer"] == 4 * (row["d_in"] + row["d_out"])


def test_routing_gives_each_row_its_own_adapter():
    model = BUILDERS["llama"]()
    ids = torch.randint(0, 100, (3, 6))
    base = logits(model, ids)
    for i, name in enumerate(["a", "b"]):
        inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), adapter_name=name)
        randomize_adapters(model, name, seed=10 + i)
    singles = {}
    for name in ["a", "b"]:
        set_active_adapter(model, name)
        singles[name] = logits(model, ids)
    with adapter_routing(model, ["b", None, "a"]):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[0], singles["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], singles["a"][2], rtol=1e-5, atol=1e-5)
    delete_adapter(model, "a")
    assert all("a" not in m.lora_A for m in model.modules() if isinstance(m, LoRALinear))
    with pytest.raises(LoralabError, match="no adapter named 'a'"):
        set_active_adapter(model, "a")


def test_presets_still_match_layers_that_already_hold_an_adapter():
    model = BUILDERS["llama"]()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention"), adapter_name="a")
    assert len(find_targets(model, "attention")) == 8
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets="attention"), adapter_name="b")
    layer = model.model.layers[0].self_attn.q_proj
    assert set(layer.lora_A) == {"a", "b"} and not isinstance(layer.base_layer, LoRALinear)
