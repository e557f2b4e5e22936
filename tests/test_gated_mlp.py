"""The fused gated-MLP product: bitwise the plain ops' gradients, a third less
of the MLP's saved activations, and only on the MLPs it recognises."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_estimate import saved_bytes
from tiny_models import ARCHS

from loralab.lora import LoRAConfig, inject_lora
from loralab.train.gated_mlp import activation_kind, gated_product, use_fused_gated_mlp

GATED = ["llama", "qwen3", "gemma2", "phi3", "olmo2"]


def tiny(arch: str, **extra):
    cls_name, kwargs, _ = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(
        vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **{**kwargs, "num_hidden_layers": 2, **extra})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).double()


def step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", GATED)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_same_gradients_as_plain_ops(arch, method):
    plain = tiny(arch)
    if method == "lora":
        inject_lora(plain, LoRAConfig(r=4, targets="all-linear", task="sft"))
        for p in plain.parameters():  # B = 0 at init: give every adapter a gradient path
            if not p.requires_grad:
                continue
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)
    fused = copy.deepcopy(plain)
    assert use_fused_gated_mlp(fused) == 2 and use_fused_gated_mlp(fused) == 0
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    want, got = step(plain.train(), ids), step(fused.train(), ids)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert fused.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_keeps_a_third_less_of_the_mlp(arch):
    """Full fine-tuning keeps gate, up and the product (down's input) per MLP;
    plain ops keep act(gate) besides."""
    plain = tiny(arch).float()
    fused = copy.deepcopy(plain)
    use_fused_gated_mlp(fused)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    before = saved_bytes(plain, lambda: plain(input_ids=ids))
    after = saved_bytes(fused, lambda: fused(input_ids=ids))
    inter = plain.config.intermediate_size
    assert before - after == 2 * 2 * 16 * inter * 4  # layers x tokens x I x fp32


def test_other_modules_left_alone():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    assert use_fused_gated_mlp(gpt2) == 0
    odd = tiny("llama", hidden_act="gelu_new")  # written out in Python: not one torch call
    assert use_fused_gated_mlp(odd) == 0
    assert activation_kind(torch.nn.GELU(approximate="tanh")) == ("gelu", "tanh")
    assert activation_kind(torch.nn.ReLU()) is None


@pytest.mark.parametrize("act", [("silu", "none"), ("gelu", "tanh"), ("gelu", "none")])
def test_product_matches_autograd(act):
    gate = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda g, u: gated_product(g, u, act), (gate, up))
    with torch.no_grad():  # nothing to save: plain ops
        assert gated_product(gate, up, act).grad_fn is None
