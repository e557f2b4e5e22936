"""Gated MLPs that keep two of their three intermediates for the backward pass.

A SwiGLU / GeGLU MLP computes ``down(act(gate(x)) * up(x))``. Run as plain
ops, autograd keeps three (tokens x intermediate) tensors per layer: the
activation's input ``gate(x)``, its output ``act(gate(x))`` and ``up(x)`` for
the product. The output is one cheap elementwise op away from the input, so
here the product is one autograd function that keeps ``gate(x)`` and ``up(x)``
and recomputes ``act(gate(x))`` in the backward: the same kernels on the same
values (``silu_backward`` / ``gelu_backward``, as autograd calls them), so the
gradients are bitwise those of the plain ops, with a third less of the MLP's
saved activations (the figures: BENCHMARKS.md, "sft peak memory").

Applied to MLP classes whose ``forward`` is transformers' Llama MLP (the
modular copies: Mistral, Qwen2/3, Gemma 1-3, OLMo 2, Granite, SmolLM3, ...) or
Phi-3's fused ``gate_up_proj``, with SiLU or GELU (exact or tanh) activations;
any other module is left as it is. Only the class changes: parameters, state
dict and saved configs are the model's own.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F


def _silu_grad(grad, x, _approx):
    return torch.ops.aten.silu_backward(grad, x)


def _gelu_grad(grad, x, approx):
    return torch.ops.aten.gelu_backward(grad, x, approximate=approx)


ACTS = {  # kind -> (forward, backward) as autograd's own formulas
    "silu": (lambda x, _approx: F.silu(x), _silu_grad),
    "gelu": (lambda x, approx: F.gelu(x, approximate=approx), _gelu_grad),
}


class GatedProduct(torch.autograd.Function):
    """``act(gate) * up``, keeping ``gate`` (and ``up`` when ``gate`` needs a
    gradient) instead of ``act(gate)``."""

    @staticmethod
    def forward(ctx, gate, up, kind: str, approx: str):
        ctx.kind, ctx.approx = kind, approx
        ctx.save_for_backward(gate, up if ctx.needs_input_grad[0] else None)
        return ACTS[kind][0](gate, approx) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        act, act_grad = ACTS[ctx.kind]
        grad_gate = act_grad(grad * up, gate, ctx.approx) if ctx.needs_input_grad[0] else None
        grad_up = grad * act(gate, ctx.approx) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None, None


def gated_product(gate: torch.Tensor, up: torch.Tensor, act: tuple[str, str]) -> torch.Tensor:
    kind, approx = act
    if (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
            and gate.dtype == up.dtype):
        return GatedProduct.apply(gate, up, kind, approx)
    return ACTS[kind][0](gate, approx) * up  # nothing to save, or mixed dtypes: plain ops


def activation_kind(act) -> tuple[str, str] | None:
    """(kind, approximate) of an activation module computed by one torch call,
    else None: SiLU, ``nn.GELU``, transformers' GELU and tanh-GELU in C."""
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu", "none"
    if isinstance(act, nn.GELU):
        return "gelu", act.approximate
    fn = getattr(act, "act", None)  # transformers' GELUActivation / GELUTanh
    if type(act).__name__ in ("GELUActivation", "GELUTanh", "PytorchGELUTanh"):
        if fn is F.gelu:
            return "gelu", "none"
        if isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args:
            return "gelu", fn.keywords.get("approximate", "none")
    return None


class _LlamaStyle:
    def forward(self, x):
        return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x),
                                            self._loralab_act))


class _Phi3Style:
    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(gated_product(gate, up, self._loralab_act))


def _same_code(a, b) -> bool:
    a, b = a.__code__, b.__code__
    return a.co_code == b.co_code and a.co_names == b.co_names


@functools.cache
def _references() -> tuple:
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    return ((LlamaMLP.forward, _LlamaStyle, "act_fn"),
            (Phi3MLP.forward, _Phi3Style, "activation_fn"))


@functools.cache
def _fused_class(cls: type, style: type) -> type:
    fused = type(cls.__name__, (style, cls), {})
    fused.__qualname__ = cls.__qualname__
    return fused


def use_fused_gated_mlp(model: nn.Module) -> int:
    """Switch every recognised gated MLP in ``model`` to the fused product in
    place; returns how many."""
    n = 0
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        if not hasattr(forward, "__code__") or hasattr(module, "_loralab_act"):
            continue
        for reference, style, act_name in _references():
            if not _same_code(forward, reference):
                continue
            act = activation_kind(getattr(module, act_name, None))
            if act is not None:
                module.__class__ = _fused_class(type(module), style)
                module._loralab_act = act
                n += 1
            break
    return n
