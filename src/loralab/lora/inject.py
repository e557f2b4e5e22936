"""Target matching, per-architecture presets, injection and freezing.

One walk over ``named_modules`` with a small table of per-architecture names
(dispatch, don't subclass); an unknown architecture still works with
``all-linear`` or explicit names.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from loralab.errors import LoralabError
from loralab.lora.base import base_shape, is_linear, replace_module
from loralab.lora.layer import LoRALinear, ModulesToSave
from loralab.lora.param import LoRAParam, find_target_parameters
from loralab.lora.variants import parse_init
from loralab.models import OUTPUT_HEADS, SEQ_CLS_HEADS, task_of_model

# Attention projections per architecture (model_type -> module-name suffixes).
ATTENTION = {
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "gpt2": ["c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense"],
    "modernbert": ["attn.Wqkv", "attn.Wo"],  # the MLP has a Wo too
    "olmo2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
# Architectures missing from the table: a linear layer counts as attention when
# a module on its path is named like one (attn, self_attn, attention,
# SelfAttention...): the convention of nearly every transformers model.
ATTENTION_PATH = re.compile(r"attn|attention", re.IGNORECASE)
PRESETS = ("attention", "all-linear")


@dataclass
class LoRAConfig:
    r: int = 8
    # alpha = 2r: the common default (e.g. Raschka's rank sweeps); scaling = alpha / r = 2.
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "attention"
    use_rslora: bool = False
    use_dora: bool = False  # DoRA (Liu et al., 2024): a learned magnitude per output row
    init_lora_weights: bool | str = True  # peft's values: gaussian, pissa[_niter_K], olora
    modules_to_save: list[str] | None = None  # None: the head for seq-cls models
    task: str | None = None  # "classify" | "sft" | None
    # 3-D parameters (MoE experts) as peft's target_parameters: "experts" or names
    target_parameters: str | list[str] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoralabError(f"rank must be a positive integer, got {self.r!r}.",
                               hint="Fix: pass --rank 8 (or 1, 2, 4, 16, ...).")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise LoralabError(f"alpha must be > 0, got {self.alpha!r}.",
                               hint="Fix: pass --alpha 16 (alpha = 2 x rank is a good default).")
        if not 0 <= self.dropout < 1:
            raise LoralabError(f"dropout must be in [0, 1), got {self.dropout!r}.",
                               hint="Fix: pass --dropout 0.05 (or 0 to disable).")
        self.init_lora_weights = parse_init(self.init_lora_weights)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers; a layer already wrapped by
    LoRALinear is named by its wrapper, so presets still match it."""
    def plain(n, m):
        return (is_linear(m) and ".lora_" not in n and ".modules_to_save." not in n
                and not n.endswith(".base_layer"))

    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear) or plain(n, m)]


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _is_head(name: str, extra: tuple[str, ...] = ()) -> bool:
    parts = name.split(".")
    return any(p in OUTPUT_HEADS + extra for p in parts[:1] + parts[-1:]) or any(
        name == h or name.startswith(h + ".") for h in OUTPUT_HEADS + extra)


def parse_targets(targets) -> str | list[str]:
    """Normalize CLI/config input: preset name, "re:<regex>", or a list of suffixes."""
    if isinstance(targets, str):
        if targets in PRESETS or targets.startswith("re:"):
            return targets
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def find_targets(model: nn.Module, targets, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the linear modules that ``targets`` selects in ``model``."""
    targets = parse_targets(targets)
    names = linear_names(model)
    if targets == "all-linear":
        found = [n for n in names if not _is_head(n, exclude)]
    elif targets == "attention":
        found = attention_targets(model, names, exclude)
    elif isinstance(targets, str) and targets.startswith("re:"):
        try:
            pattern = re.compile(targets[3:])
        except re.error as err:
            raise LoralabError(f"bad target regex {targets[3:]!r}: {err}.",
                               hint="Fix: give a valid Python regex after 're:'.") from err
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        found = [n for n in names if any(_suffix_match(n, s) for s in targets)]
    if not found:
        _require_linear(model, names, exclude)
        raise LoralabError(f"targets {targets!r} match no linear layer of this model.",
                           hint="Fix: use --targets attention|all-linear or one of: "
                           + _names_hint(names))
    return found


def attention_targets(model: nn.Module, names: list[str], exclude=()) -> list[str]:
    """The ``attention`` preset: the table's names for a known architecture, else
    every linear layer under a module named like attention (ATTENTION_PATH)."""
    mtype = _model_type(model)
    _require_linear(model, names, exclude)
    if mtype in ATTENTION:
        return [n for n in names if any(_suffix_match(n, s) for s in ATTENTION[mtype])]
    found = [n for n in names if not _is_head(n, exclude)
             and any(ATTENTION_PATH.search(p) for p in n.split(".")[:-1])]
    if not found:
        raise LoralabError(
            f"no 'attention' preset for architecture '{mtype or type(model).__name__}', and "
            "none of its linear layers "
            "sits under a module named like attention (attn, attention).",
            hint="Fix: use --targets all-linear, or name modules: " + _names_hint(names))
    return found


def _require_linear(model: nn.Module, names: list[str], exclude=()) -> None:
    """One line for a model LoRA cannot adapt: no linear layer outside its head."""
    if not [n for n in names if not _is_head(n, exclude)]:
        arch = _model_type(model) or type(model).__name__
        raise LoralabError(f"architecture '{arch}' has no linear layers for LoRA to adapt.",
                           hint="Fix: train it with --method full (or head, for a classifier).")


def _names_hint(names: list[str]) -> str:
    short = sorted({n.split(".")[-1] for n in names})
    return ", ".join(short) + " (run `loralab targets --model M` for the full list)"


def default_modules_to_save(model: nn.Module, task: str | None) -> list[str]:
    """What an adapter trains and saves whole: a sequence classifier's head
    (peft's SEQ_CLS default), plus any layer the checkpoint lacked, which
    loading initialised at random (e.g. DeBERTa's pooler before its head)."""
    is_seq_cls = task == "classify" or task_of_model(model) == "classify"
    heads = [h for h in SEQ_CLS_HEADS if is_seq_cls and isinstance(getattr(model, h, None),
                                                                   nn.Module)]
    for name in getattr(model, "loralab_fresh_modules", ()):
        if not any(name == h or name.startswith(h + ".") for h in heads):
            heads.append(name)
    return heads


# Adapter names are keys of the layers' nn.ModuleDicts, which refuse '.'.
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:-]{0,63}")


def check_adapter_name(name) -> str:
    """The one rule for adapter names, checked before any layer is touched."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise LoralabError(
            f"adapter name {name!r} is not allowed.",
            hint="Fix: use 1-64 letters, digits, '_', ':' or '-', starting with a letter or "
            "digit (no '.': write support-v2, not support.v2).")
    return name


def inject_lora(model: nn.Module, cfg: LoRAConfig, adapter_name: str = "default",
                target_names: list[str] | None = None,
                target_params: dict[str, list[str]] | None = None) -> nn.Module:
    """Wrap the target layers with LoRA adapter ``adapter_name`` and freeze all
    else but the LoRA weights and ``modules_to_save`` copies. In place.

    ``target_names`` (exact module names) overrides ``cfg.targets``; an empty
    list adds no LoRA layer (head-only training). ``target_params``
    (``{module: [parameter]}``) overrides ``cfg.target_parameters``.
    """
    check_adapter_name(adapter_name)
    mts = cfg.modules_to_save
    if mts is None:
        mts = default_modules_to_save(model, cfg.task)
    if target_names is None:
        target_names = find_targets(model, cfg.targets, exclude=tuple(mts))
    for name in target_names:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora,
                           use_dora=cfg.use_dora, init=cfg.init_lora_weights)
    for name in mts:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name)
    params = _inject_params(model, cfg, adapter_name, target_params)
    registry = model.__dict__.setdefault("loralab_adapters", {})
    registry[adapter_name] = {"config": cfg, "targets": list(target_names),
                              "modules_to_save": list(mts), "target_parameters": params}
    freeze_for_adapter(model, adapter_name)
    set_active_adapter(model, adapter_name)
    return model


def _inject_params(model: nn.Module, cfg: LoRAConfig, adapter_name: str,
                   target_params: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """LoRA on 3-D parameters (lora/param.py): one LoRAParam per module."""
    if target_params is None:
        target_params = (find_target_parameters(model, cfg.target_parameters)
                         if cfg.target_parameters else {})
    for name, pnames in target_params.items():
        module = model.get_submodule(name)
        if not isinstance(module, LoRAParam):
            module = LoRAParam(module, pnames)
            replace_module(model, name, module)
        elif module.param_names != pnames:
            raise LoralabError(f"{name} already adapts {module.param_names}, not {pnames}.",
                               hint="Fix: every adapter on a model targets the same parameters "
                               "(peft's rule for target_parameters).")
        module.add_adapter(adapter_name, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora)
    return {k: list(v) for k, v in target_params.items()}


def freeze_for_adapter(model: nn.Module, adapter_name: str) -> None:
    """Only ``adapter_name``'s LoRA weights and head copies stay trainable."""
    for pname, param in model.named_parameters():
        parts = pname.split(".")
        trainable = (any(p in parts for p in ("lora_A", "lora_B", "lora_magnitude_vector",
                                              "modules_to_save"))
                     and adapter_name in parts)
        param.requires_grad_(trainable)


def adapter_layers(model: nn.Module):
    return [m for m in model.modules()
            if isinstance(m, (LoRALinear, LoRAParam, ModulesToSave))]


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the adapter every layer uses (None or "base": no adapter)."""
    if name == "base":
        name = None
    if name is not None and name not in getattr(model, "loralab_adapters", {}):
        raise LoralabError(f"no adapter named '{name}' on this model.",
                           hint="Fix: load it first, or use one of: "
                           + ", ".join(getattr(model, "loralab_adapters", {})))
    for layer in adapter_layers(model):
        layer.active_adapter = name


def delete_adapter(model: nn.Module, name: str) -> None:
    registry = getattr(model, "loralab_adapters", {})
    if name not in registry:
        raise LoralabError(f"no adapter named '{name}' on this model.",
                           hint="Fix: use one of: " + ", ".join(registry))
    for layer in adapter_layers(model):
        table = layer.modules_to_save if isinstance(layer, ModulesToSave) else layer.lora_A
        if name in table:
            layer.delete_adapter(name)
    del registry[name]


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model: every adapter is bypassed (merged ones are unmerged)."""
    layers = adapter_layers(model)
    merged = {id(m): m.merged_adapter for m in layers if not isinstance(m, ModulesToSave)}
    for layer in layers:
        if not isinstance(layer, ModulesToSave):
            layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            if not isinstance(layer, ModulesToSave) and merged.get(id(layer)):
                layer.merge(merged[id(layer)])


@contextlib.contextmanager
def adapter_routing(model: nn.Module, names: list[str | None]):
    """Each batch row uses its own adapter (None: the base) for this block.

    Lets one forward pass serve requests for different adapters together.
    """
    names = [None if n == "base" else n for n in names]
    groups = route_groups(names)
    layers = adapter_layers(model)
    for layer in layers:
        layer.routing = names
        layer.route_groups = groups
    try:
        yield model
    finally:
        for layer in layers:
            layer.routing = None
            layer.route_groups = None


def route_groups(names: list[str | None]) -> list[tuple[str | None, torch.Tensor]]:
    """``[(adapter, row indices)]`` for a routing list, computed once per batch."""
    rows: dict[str | None, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return [(name, torch.tensor(idx, dtype=torch.long)) for name, idx in rows.items()]


def lora_shapes(model: nn.Module, names: list[str]) -> list[tuple[str, int, int]]:
    """``(name, d_in, d_out)`` of each named linear layer."""
    out = []
    for n in names:
        module = model.get_submodule(n)
        base = module.base_layer if isinstance(module, LoRALinear) else module
        d_in, d_out = base_shape(base)
        out.append((n, d_in, d_out))
    return out
