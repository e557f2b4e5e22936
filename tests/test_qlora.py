"""QLoRA: NF4 + double quant really takes ~4.127 bits/param, QLoRA equals LoRA
on the dequantized weights, and merging goes into the dequantized base."""

import copy

import pytest
import torch
from tiny_models import BUILDERS, dequantized_twin, logits, randomize_adapters
from torch import nn

from loralab.lora import LoRAConfig, LoRALinear, inject_lora, merge_and_unload
from loralab.lora.quant import (
    dequantize_weight,
    is_4bit,
    quantize_linear,
    quantize_model_4bit,
    quantized_bytes,
)

pytest.importorskip("bitsandbytes")


def test_nf4_double_quant_bits_per_parameter():
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(1024, 1024, bias=False))
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested
    bits = 8 * quantized_bytes(layer) / (1024 * 1024)
    # 4 bits + 8/64 (absmax in 8 bit) + 32/(64*256) (second-level fp32 constants)
    assert bits == pytest.approx(4.127, abs=0.01)


def test_dequantized_weight_is_close_to_original():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    q = quantize_linear(linear)
    err = (dequantize_weight(q) - linear.weight).abs().mean() / linear.weight.abs().mean()
    assert err < 0.15  # NF4 keeps weights to ~10 % mean relative error


def test_qlora_equals_lora_on_dequantized_weights():
    float_model = BUILDERS["llama"]()
    qmodel = copy.deepcopy(float_model)
    assert quantize_model_4bit(qmodel) == 14  # every linear layer but lm_head
    assert not is_4bit(qmodel.lm_head)
    ref = dequantized_twin(qmodel, float_model)
    cfg = LoRAConfig(r=4, alpha=8, targets="all-linear")
    inject_lora(qmodel, cfg)
    inject_lora(ref, cfg)
    randomize_adapters(qmodel)
    ref.load_state_dict({k: v for k, v in qmodel.state_dict().items() if ".lora_" in k},
                        strict=False)
    ids = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(logits(qmodel, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)
    # gradients flow to the LoRA weights through the 4-bit base
    qmodel.train()
    qmodel(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in qmodel.named_parameters() if ".lora_A." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_merge_goes_into_dequantized_base():
    qmodel = BUILDERS["llama"]()
    quantize_model_4bit(qmodel)
    inject_lora(qmodel, LoRAConfig(r=4, alpha=8, targets="attention"))
    randomize_adapters(qmodel)
    ids = torch.randint(0, 100, (2, 8))
    unmerged = logits(qmodel, ids)
    layer = qmodel.model.layers[0].self_attn.q_proj
    layer.merge()
    assert isinstance(layer.base_layer, nn.Linear) and not is_4bit(layer.base_layer)
    layer.unmerge()
    assert is_4bit(layer.base_layer)
    merged = merge_and_unload(qmodel)
    assert not any(is_4bit(m) or isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=1e-4, atol=1e-4)


def test_eval_forward_uses_the_dequantized_weights_exactly():
    # bitsandbytes' CPU inference kernel would repack to bf16; loralab keeps one path
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(64, 128)).eval()
    weight = dequantize_weight(q)
    x = torch.randn(3, 12, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ weight.T + q.bias, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dequantize_weight(q), weight, rtol=0, atol=0)
