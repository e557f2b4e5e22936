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


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(n_out, n_in)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    return conv


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("base", ["linear", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_frozen_base_inside_the_branch_matches_module_path(p, base, x_grad):
    """A frozen plain base's product computed inside LoRABranch (adapter and
    input gradient accumulated in place) gives the module path's output and
    gradients under the same mask draws, and keeps no more for the backward
    than the branch that adds to the base layer's output."""
    torch.manual_seed(0)
    module = {"linear": lambda: nn.Linear(16, 12), "linear-nobias": lambda: nn.Linear(16, 12, False),
              "conv1d": lambda: _conv1d(16, 12)}[base]()
    layer = LoRALinear(module.double().requires_grad_(False))
    layer.add_adapter("a", 4, 8, dropout=p)
    nn.init.normal_(layer.lora_B["a"].weight)
    layer.double().train()
    assert layer._frozen_base_t() is not None
    params = {q.untyped_storage().data_ptr() for q in layer.parameters()}

    def activations(storages):  # bytes of the saved tensors that are not weights
        unique = {st.data_ptr(): st.nbytes() for st in storages if st.data_ptr() not in params}
        return sum(unique.values())

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=x_grad)
    runs = []
    for path in ("inside", "added", "modules"):
        layer.zero_grad()
        x.grad = None
        saved = []
        torch.manual_seed(1)
        if path == "added":
            layer._frozen_base_t = lambda: None
        if path == "modules":
            layer._branch = lambda *a: None
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(t.untyped_storage()) or t, lambda t: t):
            y = layer(x)
        y.square().sum().backward()
        runs.append((y.detach(), x.grad.clone() if x_grad else torch.zeros(()),
                     layer.lora_A["a"].weight.grad.clone(),
                     layer.lora_B["a"].weight.grad.clone(), activations(saved)))
    for other in runs[1:]:
        for new, old in zip(runs[0][:4], other[:4]):
            torch.testing.assert_close(new, old)
    assert runs[0][4] <= runs[1][4]


def test_base_product_stays_with_the_base_when_it_is_not_plain():
    """Trainable, hooked or wrapped bases keep their own forward (and their
    gradients): the adapter is then added to what they return."""
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("a", 2, 4)
    assert layer._frozen_base_t() is None  # the base weight trains
    layer.base_layer.requires_grad_(False)
    assert layer._frozen_base_t() is not None
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    assert layer._frozen_base_t() is None
    layer(torch.randn(2, 8)).sum().backward()
    assert calls == [1]
    handle.remove()
    layer.base_layer.forward = lambda x: x  # a replaced forward (accelerate's hooks do this)
    assert layer._frozen_base_t() is None
    out = layer(torch.randn(2, 8))
    assert out.shape == (2, 8)
