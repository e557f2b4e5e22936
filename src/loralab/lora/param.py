"""LoRA on parameters rather than layers: the fused 3-D expert weights of
mixture-of-experts models.

transformers v5 stores a MoE block's experts as one module holding 3-D
parameters, e.g. Qwen3-MoE's ``mlp.experts.gate_up_proj`` (E, 2I, H) and
``mlp.experts.down_proj`` (E, H, I), not as ``nn.Linear`` layers, so
``target_modules`` cannot reach them. peft adapts them through
``target_parameters`` (peft/tuners/lora/layer.py, ``ParamWrapper``): per
parameter one ``lora_A`` ``Linear(in, r*E)`` and one ``lora_B``
``Linear(r*E, out)``, expert ``e`` using rows/columns ``e*r..(e+1)*r`` of the
reshaped factors, and the module's forward run on ``W + delta``. This module
keeps exactly those tensors, so an adapter saved here is one peft loads
(``peft_prefixes`` gives peft's key names, one nested wrapper per parameter;
``adapters.py`` writes and reads them).

Layout: transformers' experts are (experts, out, in) unless the module says
``is_transposed`` (then (experts, in, out)), which is what peft assumes too.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from loralab.errors import LoralabError

# A name in --target-parameters that selects every 3-D parameter of every
# experts module (gate_up_proj and down_proj on Qwen3-MoE and Mixtral).
EXPERTS = "experts"


def expert_parameters(model: nn.Module) -> dict[str, list[str]]:
    """``{module name: [its 3-D parameter names, in the module's order]}``."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRAParam):
            out[name] = list(module.param_names)
            continue
        if ".base_layer" in name or not name:
            continue
        params = [p for p, t in module.named_parameters(recurse=False) if t.ndim == 3]
        if params:
            out[name] = params
    return out


def find_target_parameters(model: nn.Module, spec) -> dict[str, list[str]]:
    """The parameters ``spec`` selects: ``"experts"`` (every 3-D parameter), or
    peft-style names matched as suffixes of ``module.param`` (``experts.down_proj``)."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    found = expert_parameters(model)
    if list(spec) != [EXPERTS]:
        found = {m: [p for p in ps if any(f"{m}.{p}" == s or f"{m}.{p}".endswith("." + s)
                                          for s in spec)] for m, ps in found.items()}
        found = {m: ps for m, ps in found.items() if ps}
    if not found:
        have = sorted({f"{m.rsplit('.', 1)[-1]}.{p}" for m, ps in expert_parameters(model).items()
                       for p in ps})
        raise LoralabError(
            f"target parameters {list(spec)!r} match no 3-D parameter of this model.",
            hint="Fix: use --target-parameters experts, or one of: "
            + (", ".join(have) or "(this model has no fused expert parameters)"))
    return found


class LoRAParam(nn.Module):
    """Wraps (does not copy) a module and adds LoRA to some of its 3-D parameters."""

    def __init__(self, base_layer: nn.Module, param_names: list[str]):
        super().__init__()
        self.base_layer = base_layer
        self.param_names = list(param_names)
        self.transposed = bool(getattr(base_layer, "is_transposed", False))
        self.lora_A = nn.ModuleDict()  # adapter -> {param: Linear(in, r * E)}
        self.lora_B = nn.ModuleDict()  # adapter -> {param: Linear(r * E, out)}
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.routing: list[str | None] | None = None
        self.route_groups = None
        self.merged_adapter: str | None = None
        self._unmerged: dict[str, torch.Tensor] = {}

    def shape(self, pname: str) -> tuple[int, int, int]:
        """``(experts, in, out)`` of one parameter."""
        e, a, b = getattr(self.base_layer, pname).shape
        return (e, a, b) if self.transposed else (e, b, a)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        if dropout:
            raise LoralabError("LoRA on expert parameters takes no dropout (peft's ParamWrapper "
                               "refuses it too: dropout cannot be factored out of W + BA).",
                               hint="Fix: pass --dropout 0 with --target-parameters.")
        weight = getattr(self.base_layer, self.param_names[0])
        kw = {"bias": False, "device": weight.device, "dtype": weight.dtype}
        self.lora_A[name], self.lora_B[name] = nn.ModuleDict(), nn.ModuleDict()
        for p in self.param_names:
            e, d_in, d_out = self.shape(p)
            self.lora_A[name][p] = nn.Linear(d_in, r * e, **kw)
            self.lora_B[name][p] = nn.Linear(r * e, d_out, **kw)
            # A: nn.Linear's Kaiming-uniform, B = 0: the base exactly at init (as peft).
            nn.init.kaiming_uniform_(self.lora_A[name][p].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name][p].weight)
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.r[name] = r
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name]
        self.scaling.pop(name)
        self.r.pop(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def delta(self, name: str, pname: str) -> torch.Tensor:
        """The update of one parameter, shaped like it (peft's get_delta_weight)."""
        e = self.shape(pname)[0]
        A = self.lora_A[name][pname].weight  # (r * E, in)
        B = self.lora_B[name][pname].weight  # (out, r * E)
        A = A.reshape(e, -1, A.shape[-1])  # (E, r, in)
        B = B.reshape(B.shape[0], -1, e)  # (out, r, E)
        pattern = "o r e, e r i -> e i o" if self.transposed else "o r e, e r i -> e o i"
        return torch.einsum(pattern, B, A) * self.scaling[name]

    def _weights(self, name: str) -> dict[str, torch.Tensor]:
        return {p: getattr(self.base_layer, p) + self.delta(name, p).to(
            getattr(self.base_layer, p).dtype) for p in self.param_names}

    def _run(self, name: str | None, args, kwargs):
        if name is None or name not in self.lora_A or name == self.merged_adapter:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, self._weights(name), args, kwargs, strict=False)

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        if self.routing is not None:
            return self._forward_routed(args, kwargs)
        return self._run(self.active_adapter, args, kwargs)

    def _forward_routed(self, args, kwargs):
        """Per-row adapters: the experts see the batch flattened to (B * T, H)
        tokens, row b owning tokens b*T..(b+1)*T; each group runs on its tokens."""
        if self.merged_adapter is not None:
            raise RuntimeError("per-row adapter routing needs unmerged adapters; unmerge first")
        n, rows = args[0].shape[0], len(self.routing)
        if n % rows:
            raise ValueError(f"routing names {rows} rows, the experts got {n} tokens")
        t = n // rows
        out = None
        for name, idx in self.route_groups or ():
            tok = (idx.to(args[0].device)[:, None] * t + torch.arange(t, device=args[0].device))
            tok = tok.flatten()  # (rows_in_group * T,)
            sub = tuple(a[tok] if torch.is_tensor(a) and a.shape[:1] == (n,) else a for a in args)
            part = self._run(name, sub, kwargs)  # (rows_in_group * T, H)
            out = part.new_zeros((n, *part.shape[1:])) if out is None else out
            out[tok] = part
        return out

    def merge(self, name: str | None = None) -> None:
        name = name or self.active_adapter
        if name is None or self.merged_adapter == name:
            return
        self.unmerge()
        weights = self._weights(name)
        for p in self.param_names:
            param = getattr(self.base_layer, p)
            self._unmerged[p] = param.data
            param.data = weights[p].detach()
        self.merged_adapter = name

    def unmerge(self) -> None:
        for p, data in self._unmerged.items():
            getattr(self.base_layer, p).data = data
        self._unmerged = {}
        self.merged_adapter = None

    def unload(self, merge: bool = True) -> nn.Module:
        """The plain module, with the active adapter folded in when ``merge``."""
        self.unmerge()
        if merge and self.active_adapter is not None:
            weights = self._weights(self.active_adapter)
            for p in self.param_names:
                getattr(self.base_layer, p).data = weights[p].detach()
        return self.base_layer

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"params={self.param_names}, adapters=[{ranks}]"


def peft_prefixes(module_name: str, param_names: list[str]) -> dict[str, str]:
    """peft's key prefix of each adapted parameter of one module.

    peft wraps one ``ParamWrapper`` per parameter, nesting them in the order
    the module defines its parameters (tuners_utils ``_inject_parameters``):
    the first is innermost. Its keys therefore read
    ``experts.base_layer.lora_A.weight`` (gate_up_proj) and
    ``experts.lora_A.weight`` (down_proj).
    """
    k = len(param_names)
    return {p: module_name + ".base_layer" * (k - 1 - i) for i, p in enumerate(param_names)}


def param_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """``{peft key (no base_model.model. prefix): tensor}`` of one adapter's parameter LoRA."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRAParam) and adapter in module.lora_A:
            for p, prefix in peft_prefixes(name, module.param_names).items():
                out[f"{prefix}.lora_A.weight"] = module.lora_A[adapter][p].weight
                out[f"{prefix}.lora_B.weight"] = module.lora_B[adapter][p].weight
    return out


def peft_target_parameters(model: nn.Module, targets: dict[str, list[str]]) -> list[str] | None:
    """The shortest peft ``target_parameters`` list that selects exactly ``targets``."""
    if not targets:
        return None
    short = sorted({f"{m.rsplit('.', 1)[-1]}.{p}" for m, ps in targets.items() for p in ps})
    try:
        if find_target_parameters(model, short) == targets:
            return short
    except LoralabError:
        pass
    return sorted(f"{m}.{p}" for m, ps in targets.items() for p in ps)


def expert_groups(model: nn.Module, rank: int) -> list[dict]:
    """The 3-D parameters ``--target-parameters`` can adapt, grouped by name:
    ``{name: "experts.down_proj", shape: [E, ...], layers, lora_per_layer}``
    (``loralab targets``; works on a meta-device model)."""
    groups: dict[str, dict] = {}
    for module_name, pnames in expert_parameters(model).items():
        module = model.get_submodule(module_name)
        module = module.base_layer if isinstance(module, LoRAParam) else module
        for p in pnames:
            e, a, b = getattr(module, p).shape  # (E, out, in), or (E, in, out) if transposed
            key = f"{module_name.rsplit('.', 1)[-1]}.{p}"
            g = groups.setdefault(key, {"name": key, "shape": [e, a, b], "layers": 0,
                                        "lora_per_layer": rank * e * (a + b)})
            g["layers"] += 1
    return list(groups.values())
