"""LoRALinear: a low-rank adapter wrapped around an existing linear layer.

    y = base(x) + (dropout(x) @ A^T @ B^T) * scaling          (Hu et al., 2021)

The base layer is kept intact as ``base_layer`` (peft's layout, so state-dict
keys match peft), which makes merge, unmerge, disable and quantized bases fall
out naturally. Several named adapters can live on one layer; one is active, or
each batch row picks its own (``routing``) for serving many adapters at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.lora.base import base_shape, is_4bit, is_conv1d
from loralab.lora.dropout import Dropout
from loralab.lora.quant import dequantize_linear


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool):
    """The weight update B @ A * scaling, in fp32; (out, in), or (in, out) for Conv1D.

    A pure function of tensors, so offline merging is testable without a model.
    """
    delta = (B.float() @ A.float()) * scaling  # (out, r) @ (r, in) -> (out, in)
    return delta.T if fan_in_fan_out else delta


def merge_weight(weight, A, B, scaling, fan_in_fan_out=False):
    """Return ``weight + delta`` computed in fp32 and cast back to the weight's dtype."""
    return (weight.float() + lora_delta(A, B, scaling, fan_in_fan_out)).to(weight.dtype)


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
                    use_rslora: bool = False) -> None:
        weight = self.base_weight_ref()
        device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        # rsLoRA (Kalajdzievski, 2023): alpha / sqrt(r) keeps updates stable at high rank.
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.r[name] = r
        self.reset_adapter(name)
        if self.active_adapter is None:
            self.active_adapter = name

    def reset_adapter(self, name: str) -> None:
        # A as nn.Linear's own init (Kaiming-uniform, a=sqrt(5)); B = 0, so the
        # wrapped layer equals the base exactly at init (Hu et al., 2021, §4.1).
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        self.scaling.pop(name)
        self.r.pop(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def base_weight_ref(self) -> torch.Tensor:
        return self.base_layer.weight

    # -- forward ------------------------------------------------------------
    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        x = x.to(A.weight.dtype)
        return B(A(self.lora_dropout[name](x))) * self.scaling[name]  # (..., in) -> (..., out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        if self.disabled:
            return result
        if self.routing is not None:
            return self._forward_routed(x, result)
        name = self.active_adapter
        if name is None or name not in self.lora_A or name == self.merged_adapter:
            return result
        A, B = self.lora_A[name], self.lora_B[name]
        h = A(self.lora_dropout[name](x.to(A.weight.dtype)))  # (..., r)
        if h.dtype == result.dtype:
            # B's matmul, the scaling and the add in one addmm: no (..., out)
            # intermediate, and no in-place write whose backward would copy
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                              B.weight.t(), alpha=self.scaling[name])
            return out.view(result.shape)
        return result + (B(h) * self.scaling[name]).to(result.dtype)

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
            delta[idx] = self._lora(name, x[idx]).to(result.dtype)  # (rows, T, out)
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
            weight.data = merge_weight(weight.data, self.lora_A[name].weight,
                                       self.lora_B[name].weight, self.scaling[name],
                                       self.fan_in_fan_out)
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
            linear.weight.data = merge_weight(linear.weight.data, self.lora_A[name].weight,
                                              self.lora_B[name].weight, self.scaling[name])
        return linear

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
            weight.data = merge_weight(weight.data, self.lora_A[name].weight,
                                       self.lora_B[name].weight, self.scaling[name],
                                       self.fan_in_fan_out)
        return self.base_layer

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
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
