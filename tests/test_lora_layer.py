"""LoRALinear against references: identity at init, hand computation,
merge == unmerged, unmerge bit-exact, disable, Conv1D."""

import math

import pytest
import torch
from tiny_models import BUILDERS, logits, randomize_adapters
from torch import nn

from loralab.errors import LoralabError
from loralab.lora import (
    LoRAConfig,
    LoRALinear,
    disable_adapter,
    inject_lora,
    lora_delta,
    merge_weight,
)


def test_identity_at_init_and_init_scheme():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base)
    layer.add_adapter("default", r=4, alpha=8)
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    A = layer.lora_A["default"].weight
    assert A.abs().max() <= bound and A.std() > bound / 4


def test_forward_equals_hand_computation():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base)
    layer.add_adapter("default", r=4, alpha=12)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 3, 16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.weight.T + base.bias + (x @ A.T @ B.T) * (12 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scaling():
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("a", r=16, alpha=8, use_rslora=True)
    layer.add_adapter("b", r=16, alpha=8)
    assert layer.scaling["a"] == pytest.approx(8 / 4)
    assert layer.scaling["b"] == pytest.approx(0.5)


def test_dropout_only_on_lora_path():
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("default", r=2, alpha=4, dropout=0.5)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    layer.add_adapter("nodrop", r=2, alpha=4, dropout=0.0)
    assert isinstance(layer.lora_dropout["nodrop"], nn.Identity)
    layer.train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: dropout never touches base


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "qwen3"])
def test_merge_equals_unmerged_and_unmerge_is_bit_exact(arch):
    model = BUILDERS[arch]()
    ids = torch.randint(0, 100, (2, 9))
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    unmerged = logits(model, ids)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.merge()
        m.merge()  # idempotent
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-4, atol=1e-5)
    for m in layers:
        m.unmerge()
        m.unmerge()
    for name, p in model.named_parameters():
        key = name.replace(".base_layer", "").replace(".original_module", "")
        if key in originals:
            assert torch.equal(p, originals[key]), name
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_disable_gives_base_outputs(arch):
    model = BUILDERS[arch]()
    ids = torch.randint(0, 100, (2, 6))
    base = logits(model, ids)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    tuned = logits(model, ids)
    assert not torch.allclose(tuned, base)
    with disable_adapter(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), tuned, rtol=0, atol=0)


def test_gpt2_conv1d_is_wrapped_with_transposed_delta():
    model = BUILDERS["gpt2"]()
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets="attention"))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(1, 4, 32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    merged_w = merge_weight(layer.base_layer.weight, A, B, layer.scaling["default"], True)
    torch.testing.assert_close(layer(x), x @ merged_w + layer.base_layer.bias,
                               rtol=1e-4, atol=1e-5)


def test_delta_is_computed_in_fp32_and_cast_back():
    w = torch.randn(8, 4, dtype=torch.bfloat16)
    A, B = torch.randn(2, 4), torch.randn(8, 2)
    out = merge_weight(w, A, B, 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (w.float() + B @ A * 0.5).bfloat16().float())
    assert lora_delta(A, B, 1.0, True).shape == (4, 8)


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": -1}, {"alpha": 0}, {"dropout": 1.0},
                                    {"dropout": -0.1}])
def test_bad_hyperparameters_name_the_fix(kwargs):
    with pytest.raises(LoralabError, match="Fix"):
        LoRAConfig(**kwargs)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_branch_matches_module_path_and_keeps_less(p):
    """LoRABranch (the training path) gives the module path's output and gradients
    under the same mask draws, and keeps fewer bytes for the backward."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12).double())
    layer.add_adapter("a", 4, 8, dropout=p)
    nn.init.normal_(layer.lora_B["a"].weight)
    layer.double().train()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    runs = []
    for branch in (True, False):
        layer.zero_grad()
        x.grad = None
        saved = []
        torch.manual_seed(1)
        if not branch:
            layer._branch = lambda *a: None
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(t.untyped_storage().nbytes()) or t,
                lambda t: t):
            y = layer(x)
        y.square().sum().backward()
        runs.append((y.detach(), x.grad.clone(), layer.lora_A["a"].weight.grad.clone(),
                     layer.lora_B["a"].weight.grad.clone(), sum(saved)))
    for new, old in zip(runs[0][:4], runs[1][:4]):
        torch.testing.assert_close(new, old)
    if p > 0:  # a bool mask, not the float mask and the dropped copy
        assert runs[0][4] < runs[1][4]
