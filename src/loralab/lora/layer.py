"""LoRALinear: a low-rank adapter wrapped around an existing linear layer.

    y = base(x) + (dropout(x) @ A^T @ B^T) * scaling          (Hu et al., 2021)

DoRA (Liu et al., 2024) rescales each output row of W + ΔW to a learned
magnitude m: ``y = m / ||W + ΔW|| * (W + ΔW) x``, the norm detached (§4.3);
PiSSA and OLoRA start A and B from W's principal directions and keep the
residual in the base weight (``loralab.lora.variants`` holds the formulas).

The base layer is kept intact as ``base_layer`` (peft's layout, so state-dict
keys match peft), which makes merge, unmerge, disable and quantized bases fall
out naturally. Several named adapters can live on one layer; one is active, or
each batch row picks its own (``routing``) for serving many adapters at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loralab.errors import LoralabError
from loralab.lora.base import base_shape, is_4bit, is_conv1d
from loralab.lora.dropout import Dropout, as_float, keep_mask_like
from loralab.lora.quant import dequantize_linear, dequantize_weight
from loralab.lora.variants import dora_merged, dora_weight_norm, is_mutated_init, mutated_factors


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool):
    """The weight update B @ A * scaling, in fp32; (out, in), or (in, out) for Conv1D.

    A pure function of tensors, so offline merging is testable without a model.
    """
    delta = (B.float() @ A.float()) * scaling  # (out, r) @ (r, in) -> (out, in)
    return delta.T if fan_in_fan_out else delta


def merge_weight(weight, A, B, scaling, fan_in_fan_out=False):
    """Return ``weight + delta`` computed in fp32 and cast back to the weight's dtype."""
    return (weight.float() + lora_delta(A, B, scaling, fan_in_fan_out)).to(weight.dtype)


class LoRABranch(torch.autograd.Function):
    """``base + s/(1-p) · ((x ⊙ keep) @ Aᵀ) @ Bᵀ``, the training path of a plain adapter.

    Autograd would keep, per adapted layer, the dropped input and the float mask
    it was multiplied by (8 bytes per input element), and each of query, key and
    value would keep its own. This keeps ``x`` itself (one tensor, shared by every
    adapter reading it), the bool keep-mask (1 byte per element, none without
    dropout) and the (N, r) ``h``; the backward recomputes ``x ⊙ keep``, one
    elementwise pass. The forward skips the dropout module's scaling pass over
    ``x``: the 1/(1-p) is folded into the scaling. The mask is multiplied as
    floats cast from its bytes (:func:`~loralab.lora.dropout.as_float`), never as
    bool. Same expectation as the module path, and on CPU the same mask draws
    as :class:`~loralab.lora.dropout.Dropout`.

    ``base`` is either the base layer's output (N, out), to which the adapter's
    product is added, or, for a frozen plain linear base, None with its weight
    as ``base_t`` (in, out) and its ``bias``: then the base product is computed
    here and the adapter's accumulated into it in place, and the backward
    accumulates the adapter's input gradient into the base's in place too
    (``addmm_``, ``addcmul_``): one (N, out) copy in the forward, one (N, in)
    tensor and sum in the backward and an autograd node fewer per layer
    (BENCHMARKS.md, "The base product inside the adapter's function").
    """

    @staticmethod
    def forward(ctx, base, x, base_t, bias, weight_a, weight_b, scaling: float, p: float):
        # base: (N, out) or None, x: (N, in), base_t: (in, out) or None,
        # weight_a: (r, in), weight_b: (out, r)
        keep = keep_mask_like(x, p) if p > 0 else None  # (N, in) bool
        h = torch.mm(x if keep is None else x * as_float(keep, x.dtype), weight_a.t())  # (N, r)
        s = scaling / (1.0 - p)
        ctx.save_for_backward(x, keep, h, weight_a, weight_b, base_t)
        ctx.s = s
        if base is not None:
            return torch.addmm(base, h, weight_b.t(), alpha=s)  # (N, out)
        out = torch.mm(x, base_t) if bias is None else torch.addmm(bias, x, base_t)
        return out.addmm_(h, weight_b.t(), alpha=s)  # (N, out)

    @staticmethod
    def backward(ctx, grad):  # grad: (N, out)
        x, keep, h, weight_a, weight_b, base_t = ctx.saved_tensors
        s = ctx.s
        need_base, need_x = ctx.needs_input_grad[:2]
        need_a, need_b = ctx.needs_input_grad[4:6]
        g_h = torch.mm(grad, weight_b).mul_(s)  # (N, r)
        grad_x = grad_a = grad_b = None
        mask = None if keep is None or not (need_a or need_x) else as_float(keep, x.dtype)
        if need_b:
            grad_b = torch.mm(grad.t(), h).mul_(s)  # (out, r)
        if need_a:
            grad_a = torch.mm(g_h.t(), x if mask is None else x * mask)  # (r, in)
        if need_x and base_t is None:  # the base layer's own backward adds its part
            grad_x = torch.mm(g_h, weight_a)  # (N, in)
            if mask is not None:
                grad_x.mul_(mask)
        elif need_x:  # the base's part, then the adapter's added in place
            grad_x = torch.mm(grad, base_t.t())  # (N, in)
            if mask is None:
                grad_x.addmm_(g_h, weight_a)
            else:
                grad_x.addcmul_(torch.mm(g_h, weight_a), mask)
        return (grad if need_base else None, grad_x, None, None, grad_a, grad_b, None, None)


class DoRAMagnitude(nn.Module):
    """DoRA's magnitude vector m (out,) as ``weight``: peft's DoraLinearLayer
    layout, so the in-model key is ``lora_magnitude_vector.<adapter>.weight``."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoRALinear(nn.Module):
    """Wraps (does not copy) a linear base layer and adds named LoRA adapters."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_shape(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        # PiSSA/OLoRA: (A0, B0) the adapter started from, to write it as a plain LoRA
        self.init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.routing: list[str | None] | None = None  # per-row adapter names
        self.route_groups = None  # [(adapter, row indices)], set with routing
        self.merged_adapter: str | None = None
        self._unmerged_base = None  # what merge() replaced, restored bit-exactly

    # -- adapters -----------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    init: bool | str = True) -> None:
        """``init``: peft's init_lora_weights (True, False, "gaussian", "pissa",
        "pissa_niter_K", "olora"; see ``variants.parse_init``)."""
        weight = self.base_weight_ref()
        device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        # rsLoRA (Kalajdzievski, 2023): alpha / sqrt(r) keeps updates stable at high rank.
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.r[name] = r
        self.reset_adapter(name, init)
        if use_dora:  # after the init: m starts at ||W_res + s·B0A0|| = ||W||
            self.add_magnitude(name)
        if self.active_adapter is None:
            self.active_adapter = name

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """A and B as peft's ``init_lora_weights`` says (peft's update_layer)."""
        if init is False:  # nn.Linear's random init for both: not a no-op (tests)
            return
        if is_mutated_init(init):
            self._mutated_init(name, init)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            # A as nn.Linear's own init (Kaiming-uniform, a=sqrt(5)); B = 0, so the
            # wrapped layer equals the base exactly at init (Hu et al., 2021, §4.1).
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def _mutated_init(self, name: str, init: str) -> None:
        """PiSSA/OLoRA: A0, B0 from W; the base keeps ``W - s·B0A0`` (peft's
        pissa_init/olora_init), so the layer still equals the base at init."""
        if is_4bit(self.base_layer):
            raise LoralabError(
                f"init_lora_weights={init} needs a float base: the residual W - BA of a 4-bit "
                "base cannot be kept without re-quantizing it (peft refuses PiSSA on 4-bit too).",
                hint="Fix: use --method lora with PiSSA/OLoRA, or the default init with qlora.")
        weight = self.base_layer.weight
        dense = self.dense_weight()  # (out, in) fp32
        scaling = self.scaling[name]
        A0, B0 = mutated_factors(dense, self.r[name], scaling, init)  # (r, in), (out, r)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A0)
            self.lora_B[name].weight.copy_(B0)
            residual = dense - scaling * (B0 @ A0)  # (out, in)
            weight.data = (residual.T if self.fan_in_fan_out else residual).contiguous().to(
                weight.dtype)
        self.init_factors[name] = (self.lora_A[name].weight.detach().clone(),
                                   self.lora_B[name].weight.detach().clone())

    def add_magnitude(self, name: str) -> None:
        """DoRA's m = ||W + s·BA|| per output row, so the layer is unchanged at init."""
        with torch.no_grad():
            norm = dora_weight_norm(self.dense_weight(), self.delta_weight_dense(name))
        dtype = self.lora_A[name].weight.dtype
        self.lora_magnitude_vector[name] = DoRAMagnitude(norm.to(dtype))  # (out,)

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a float (out, in) tensor: the 4-bit base dequantized
        (QDoRA norms use the weights the layer computes with), Conv1D transposed."""
        if is_4bit(self.base_layer):
            return dequantize_weight(self.base_layer)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight_dense(self, name: str) -> torch.Tensor:
        """``s·B @ A`` as (out, in), in the adapter's dtype."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return (B @ A) * self.scaling[name]  # (out, r) @ (r, in)

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.init_factors.pop(name, None)
        self.scaling.pop(name)
        self.r.pop(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def base_weight_ref(self) -> torch.Tensor:
        return self.base_layer.weight

    # -- forward ------------------------------------------------------------
    def _lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``result``."""
        if name in self.lora_magnitude_vector:
            return self._dora(name, x, result)
        A, B = self.lora_A[name], self.lora_B[name]
        x = x.to(A.weight.dtype)
        return B(A(self.lora_dropout[name](x))) * self.scaling[name]  # (..., in) -> (..., out)

    def _dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``(m/||W + sBA|| - 1) · Wx + m/||W + sBA|| · s·BAx`` (peft's DoraLinearLayer).

        The norm is detached (DoRA §4.3: it then needs no gradient memory); with
        dropout in training the base term is recomputed on the dropped input.
        """
        A, B = self.lora_A[name], self.lora_B[name]
        dtype = A.weight.dtype
        weight = self.dense_weight().to(dtype)  # (out, in)
        with torch.no_grad():  # a constant in backward: no graph for the (out, in) sum
            norm = dora_weight_norm(weight, self.delta_weight_dense(name))  # (out,)
        scale = self.lora_magnitude_vector[name].weight / norm  # (out,)
        dropout = self.lora_dropout[name]
        x = x.to(dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result.to(dtype) - (bias.to(dtype) if bias is not None else 0)  # (..., out)
        else:
            x = dropout(x)
            base = F.linear(x, weight)  # (..., out)
        lora = B(A(x)) * self.scaling[name]  # (..., out)
        return ((scale - 1) * base + scale * lora).to(result.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        plain = self._plain_active(name)
        if plain and torch.is_grad_enabled() and not (args or kwargs):
            branch = self._branch(name, x, None)  # the base product inside, when it can be
            if branch is not None:
                return branch
        result = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        if self.routing is not None and not self.disabled:
            return self._forward_routed(x, result)
        if not plain:  # disabled, no active adapter, merged, or DoRA
            dora = (not self.disabled and name in self.lora_magnitude_vector
                    and name != self.merged_adapter)
            return result + self._dora(name, x, result) if dora else result
        A, B = self.lora_A[name], self.lora_B[name]
        if torch.is_grad_enabled():
            branch = self._branch(name, x, result)
            if branch is not None:
                return branch
        h = A(self.lora_dropout[name](x.to(A.weight.dtype)))  # (..., r)
        if h.dtype == result.dtype:
            # B's matmul, the scaling and the add in one addmm: no (..., out)
            # intermediate, and no in-place write whose backward would copy
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                              B.weight.t(), alpha=self.scaling[name])
            return out.view(result.shape)
        return result + (B(h) * self.scaling[name]).to(result.dtype)

    def _plain_active(self, name: str | None) -> bool:
        """The active adapter is a plain LoRA on this layer, applied unmerged."""
        return (not self.disabled and self.routing is None and name is not None
                and name in self.lora_A and name != self.merged_adapter
                and name not in self.lora_magnitude_vector)

    def _frozen_base_t(self) -> torch.Tensor | None:
        """The base weight as (in, out) when the base layer is a frozen
        ``nn.Linear`` or GPT-2 ``Conv1D`` whose forward is its class's own (no
        hooks, no replaced ``forward``), so :class:`LoRABranch` may compute its
        product itself; else None."""
        base = self.base_layer
        linear = type(base) is nn.Linear
        if not (linear or is_conv1d(base)) or base._forward_hooks or base._forward_pre_hooks:
            return None
        if "forward" in base.__dict__ or base.weight.requires_grad:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        return base.weight.t() if linear else base.weight

    def _branch(self, name: str, x: torch.Tensor, result: torch.Tensor | None):
        """The adapter's training forward as :class:`LoRABranch`, in the compute
        dtype (autocast's, when on); None where the dtypes do not line up. With
        ``result`` None the base product is computed inside too, where the base
        allows it (:meth:`_frozen_base_t`, no autocast); else None."""
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        device = x.device.type
        base_t = bias = None
        if result is None:
            base_t = self._frozen_base_t()
            if base_t is None or torch.is_autocast_enabled(device):
                return None
            bias = self.base_layer.bias
            if not (x.dtype == base_t.dtype == weight_a.dtype
                    and (bias is None or bias.dtype == x.dtype)):
                return None
        elif torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight_a, weight_b = x.to(dtype), weight_a.to(dtype), weight_b.to(dtype)
            result = result.to(dtype)
        if result is not None and not (x.dtype == weight_a.dtype == result.dtype):
            return None
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        if p >= 1:
            return None
        flat = None if result is None else result.reshape(-1, result.shape[-1])
        out = LoRABranch.apply(flat, x.reshape(-1, x.shape[-1]), base_t, bias,
                               weight_a, weight_b, self.scaling[name], p)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _forward_routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each batch row uses its own adapter (None: the base) in one pass."""
        if self.merged_adapter is not None:
            raise RuntimeError("per-row adapter routing needs unmerged adapters; unmerge first")
        if len(self.routing) != x.shape[0]:
            raise ValueError(f"routing names {len(self.routing)} rows, batch has {x.shape[0]}")
        delta = torch.zeros_like(result)
        for name, idx in self.route_groups or ():
            if name is None or name not in self.lora_A:
                continue
            idx = idx.to(x.device)
            delta[idx] = self._lora(name, x[idx], result[idx]).to(result.dtype)  # (rows, T, out)
        return result + delta

    # -- merge --------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        return lora_delta(self.lora_A[name].weight, self.lora_B[name].weight,
                          self.scaling[name], self.fan_in_fan_out)

    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: active) into the base weight.

        Idempotent. The original weight (or the quantized base layer) is kept so
        that :meth:`unmerge` restores it bit-exactly.
        """
        name = name or self.active_adapter
        if name is None or self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        if is_4bit(self.base_layer):
            # kept outside _modules: not part of the state dict while merged
            object.__setattr__(self, "_unmerged_base", self.base_layer)
            self.base_layer = self._dequantized_linear(name)
        else:
            weight = self.base_layer.weight
            self._unmerged_base = weight.data
            weight.data = self.merged_weight(weight.data, name)
        self.merged_adapter = name

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        if isinstance(self._unmerged_base, nn.Module):
            self.base_layer = self._unmerged_base
        else:
            self.base_layer.weight.data = self._unmerged_base
        self._unmerged_base = None
        self.merged_adapter = None

    def _dequantized_linear(self, name: str | None) -> nn.Linear:
        """A float nn.Linear holding the dequantized 4-bit base (+ the adapter's delta).

        A QLoRA adapter was trained against the dequantized weights, so that is
        what it must be merged into; re-quantizing the sum would add new error.
        """
        linear = dequantize_linear(self.base_layer)
        if name is not None:
            linear.weight.data = self.merged_weight(linear.weight.data, name)
        return linear

    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight`` (as stored: (out, in), or (in, out) for Conv1D) with adapter
        ``name`` folded in, in fp32, cast back; DoRA: ``m/||W+ΔW|| · (W+ΔW)``."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if name not in self.lora_magnitude_vector:
            return merge_weight(weight, A, B, self.scaling[name], self.fan_in_fan_out)
        dense = weight.T if self.fan_in_fan_out else weight  # (out, in)
        merged = dora_merged(dense, lora_delta(A, B, self.scaling[name], False),
                             self.lora_magnitude_vector[name].weight)
        return (merged.T if self.fan_in_fan_out else merged).contiguous().to(weight.dtype)

    def unload(self, merge: bool = True) -> nn.Module:
        """The plain base layer, with the active adapter folded in when ``merge``.

        No copy of the original weight is kept (this is the end of the adapter).
        """
        if self.merged_adapter is not None:
            self.unmerge()
        name = self.active_adapter if merge else None
        if is_4bit(self.base_layer):
            return self._dequantized_linear(name)
        if name is not None:
            weight = self.base_layer.weight
            weight.data = self.merged_weight(weight.data, name)
        return self.base_layer

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}{' dora' if n in self.lora_magnitude_vector else ''}"
                          for n, r in self.r.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}]"


class ModulesToSave(nn.Module):
    """Keeps the original module and a trainable copy per adapter (peft's layout:
    ``original_module`` and ``modules_to_save.<adapter>``), e.g. a classification head."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.routing: list[str | None] | None = None
        self.route_groups = None

    def add_adapter(self, name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def _module(self, name: str | None) -> nn.Module:
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x, *args, **kwargs):
        if self.routing is None or self.disabled:
            return self._module(self.active_adapter)(x, *args, **kwargs)
        outs = [None] * x.shape[0]
        for name, idx in self.route_groups or ():
            out = self._module(name)(x[idx.to(x.device)], *args, **kwargs)  # (rows, ...)
            for j, i in enumerate(idx.tolist()):
                outs[i] = out[j]
        return torch.stack(outs)
