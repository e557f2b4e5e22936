"""LoRA on Qwen3-MoE's fused 3-D expert parameters (lora/param.py) against peft's
ParamWrapper: identity at init, peft loads ours and we load peft's with equal
logits, merge/unmerge, disable, per-row routing, and the errors."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from loralab.errors import LoralabError
from loralab.lora import (
    LoRAConfig,
    adapter_routing,
    disable_adapter,
    inject_lora,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from loralab.lora.param import LoRAParam, find_target_parameters

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_moe(seed=0, kind="qwen3_moe"):
    torch.manual_seed(seed)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
            vocab_size=100)).eval()
    cfg = Qwen3MoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64,
                         moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                         vocab_size=100)
    return Qwen3MoeForCausalLM(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomized(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_experts_are_found_and_identity_at_init():
    model = tiny_moe()
    assert find_target_parameters(model, "experts") == {
        f"model.layers.{i}.mlp.experts": ["gate_up_proj", "down_proj"] for i in range(2)}
    assert find_target_parameters(model, "experts.down_proj") == {
        f"model.layers.{i}.mlp.experts": ["down_proj"] for i in range(2)}
    ref = logits(model)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_parameters="experts"))
    assert isinstance(model.model.layers[0].mlp.experts, LoRAParam)
    assert torch.equal(logits(model), ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts.lora_A.default.gate_up_proj." in n for n in trainable)
    assert not any(n.endswith("experts.base_layer.gate_up_proj") for n in trainable)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_peft_loads_ours_and_we_load_peft(tmp_path, kind):
    from peft import LoraConfig, PeftModel, get_peft_model

    def moe():
        return tiny_moe(kind=kind)

    base = moe()
    base.save_pretrained(tmp_path / "base")
    ref = logits(base)
    ours = randomized(inject_lora(moe(), LoRAConfig(r=2, alpha=4, target_parameters="experts")))
    out = logits(ours)
    assert not torch.allclose(out, ref, atol=1e-4)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(tmp_path / "base"))
    theirs = PeftModel.from_pretrained(moe(), tmp_path / "ours").eval()
    assert torch.allclose(logits(theirs), out, atol=1e-6)

    peft_model = get_peft_model(moe(), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["experts.gate_up_proj", "experts.down_proj"])).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(moe(), tmp_path / "peft").eval()
    assert torch.allclose(logits(loaded), logits(peft_model), atol=1e-6)


def test_merge_unmerge_disable_and_routing():
    model = tiny_moe()
    ref = logits(model)
    randomized(inject_lora(model, LoRAConfig(r=2, alpha=4, targets=["q_proj"],
                                             target_parameters="experts")))
    out = logits(model)
    with disable_adapter(model):
        assert torch.allclose(logits(model), ref, atol=1e-6)
    layer = model.model.layers[0].mlp.experts
    before = layer.base_layer.down_proj.detach().clone()
    layer.merge()
    assert torch.allclose(logits(model), out, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.down_proj, before)
    with adapter_routing(model, ["default", None]):
        routed = logits(model)
    assert torch.allclose(routed[0], out[0], atol=1e-5)
    assert torch.allclose(routed[1], ref[1], atol=1e-5)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoRAParam) for m in merged.modules())
    assert torch.allclose(logits(merged), out, atol=1e-5)


def test_errors():
    with pytest.raises(LoralabError, match="match no 3-D parameter"):
        inject_lora(tiny_moe(), LoRAConfig(target_parameters="experts.nope"))
    with pytest.raises(LoralabError, match="takes no dropout"):
        inject_lora(tiny_moe(), LoRAConfig(dropout=0.1, target_parameters="experts"))
