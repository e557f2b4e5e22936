"""Adapters on disk in the PEFT format, and merging.

``adapter_config.json`` + ``adapter_model.safetensors`` with peft's key names
(``base_model.model.<module>.lora_A.weight``; heads as
``base_model.model.<head>.weight``), so adapters move between loralab, peft,
vLLM and the rest unchanged. loralab's own metadata (the model alias the user
named, the task) goes in a separate ``loralab.json`` that peft ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from loralab.errors import LoralabError
from loralab.io import atomic_dir, atomic_write_json
from loralab.lora.base import is_4bit, replace_module
from loralab.lora.inject import (
    LoRAConfig,
    adapter_layers,
    check_adapter_name,
    find_targets,
    inject_lora,
)
from loralab.lora.layer import LoRALinear, ModulesToSave
from loralab.lora.param import (
    LoRAParam,
    find_target_parameters,
    param_tensors,
    peft_target_parameters,
)
from loralab.lora.quant import dequantize_model
from loralab.lora.variants import (
    as_plain_lora,
    check_peft_config,
    converted_alpha,
    is_mutated_init,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "loralab.json"
PREFIX = "base_model.model."
# loralab task -> peft task_type, and back (a CAUSAL_LM adapter without
# loralab.json is taken for instruction tuning).
TASK_TYPES = {"classify": "SEQ_CLS", "sft": "CAUSAL_LM", "lm": "CAUSAL_LM"}
PEFT_TASKS = {"SEQ_CLS": "classify", "CAUSAL_LM": "sft"}
LABELS_NAME = "labels.json"  # a run's label map, beside adapter/ or inside it


def _task_of(model: nn.Module, task: str | None) -> str | None:
    from loralab.models import task_of_model

    return task or task_of_model(model)


PEFT_NO_TARGETS = "dummy-target-modules"  # peft.utils.constants.DUMMY_TARGET_MODULES


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest peft ``target_modules`` list selecting exactly ``names``.

    A head-only adapter adapts no layer: peft refuses an empty list ("no
    target_modules passed") but accepts its own marker for an adapter that
    matches no module, and still restores ``modules_to_save`` (the head).
    """
    suffixes = sorted({n.split(".")[-1] for n in names})
    if not names:
        return PEFT_NO_TARGETS
    try:
        if sorted(find_targets(model, suffixes)) == sorted(names):
            return suffixes
    except LoralabError:
        pass
    return sorted(names)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                       as_lora: bool = False) -> dict:
    """peft-keyed tensors of one adapter (LoRA A/B, DoRA magnitudes, head copies).

    ``as_lora``: a PiSSA/OLoRA adapter as the rank-2r plain LoRA relative to the
    original base (peft's ``path_initial_model_for_weight_conversion``).
    """
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            if as_lora and adapter_name in module.init_factors:
                A, B = as_plain_lora(A, B, *module.init_factors[adapter_name])
            state[f"{PREFIX}{name}.lora_A.weight"] = A
            state[f"{PREFIX}{name}.lora_B.weight"] = B
            if adapter_name in module.lora_magnitude_vector:  # peft's key, no ".weight"
                state[f"{PREFIX}{name}.lora_magnitude_vector"] = (
                    module.lora_magnitude_vector[adapter_name].weight)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter_name].state_dict().items():
                state[f"{PREFIX}{name}.{pname}"] = p
    state.update({PREFIX + k: v for k, v in param_tensors(model, adapter_name).items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def peft_config_dict(model: nn.Module, adapter_name: str, base_model_name_or_path: str | None,
                     as_lora: bool = False):
    entry = model.loralab_adapters[adapter_name]
    cfg: LoRAConfig = entry["config"]
    names = entry["targets"]
    fan_in_fan_out = any(model.get_submodule(n).fan_in_fan_out for n in names)
    task = _task_of(model, cfg.task)
    init = cfg.init_lora_weights
    r, alpha = cfg.r, cfg.alpha
    if as_lora and is_mutated_init(init):  # rank 2r, same scaling (peft's save_pretrained)
        r, alpha, init = 2 * r, converted_alpha(alpha, cfg.use_rslora), True
    return {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(task),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_modules(model, names),
        "target_parameters": peft_target_parameters(model, entry.get("target_parameters")),
        "use_rslora": cfg.use_rslora,
        "modules_to_save": entry["modules_to_save"] or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": init,
        "use_dora": cfg.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, out_dir, *, base_model_name_or_path: str | None = None,
                 adapter_name: str = "default", metadata: dict | None = None,
                 as_lora: bool = False) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``out_dir`` (atomically);
    ``as_lora``: PiSSA/OLoRA converted to a plain LoRA (``adapter_state_dict``)."""
    from safetensors.torch import save_file

    if adapter_name not in getattr(model, "loralab_adapters", {}):
        raise LoralabError(f"the model has no adapter named '{adapter_name}' to save.")
    base = base_model_name_or_path or getattr(model, "loralab_model_name", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None)
    config = peft_config_dict(model, adapter_name, base, as_lora=as_lora)
    task = _task_of(model, model.loralab_adapters[adapter_name]["config"].task)
    meta = {"base_model": base, "task": task}
    if any(is_4bit(m.base_layer) for m in model.modules() if isinstance(m, LoRALinear)):
        meta["quantized"] = "nf4"  # merge must go into the dequantized base
    meta.update(metadata or {})
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(adapter_state_dict(model, adapter_name, as_lora), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_NAME, config)
        atomic_write_json(tmp / META_NAME, meta)
    return out_dir


def read_adapter_config(adapter_dir) -> dict:
    """The adapter's peft config, checked: files present, JSON valid, LoRA type."""
    adapter_dir = Path(adapter_dir)
    fix = "Fix: point --adapter at a directory saved by `loralab train` or peft's save_pretrained."
    if not adapter_dir.is_dir():
        raise LoralabError(f"adapter dir '{adapter_dir}' does not exist.", hint=fix)
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not (adapter_dir / fname).is_file():
            alt = adapter_dir / "adapter"
            if (alt / CONFIG_NAME).is_file():
                return read_adapter_config(alt)
            raise LoralabError(f"adapter dir '{adapter_dir}' has no {fname}.", hint=fix)
    try:
        config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoralabError(f"{adapter_dir / CONFIG_NAME} is not valid JSON ({err}).",
                           hint=fix) from err
    if config.get("peft_type", "LORA") != "LORA":
        raise LoralabError(f"adapter in '{adapter_dir}' is {config.get('peft_type')}, not LoRA.",
                           hint="Fix: loralab loads LoRA adapters only.")
    config["_dir"] = str(adapter_dir)
    meta = adapter_dir / META_NAME
    config["_loralab"] = json.loads(meta.read_text()) if meta.is_file() else {}
    return config


def adapter_base(config: dict, base: str | None = None) -> str | None:
    """The base model an adapter is for: ``base`` when the user gave one, else
    what loralab.json or peft's ``base_model_name_or_path`` recorded."""
    return base or config["_loralab"].get("base_model") or config.get("base_model_name_or_path")


def adapter_task(config: dict) -> str | None:
    """The loralab task of an adapter read by :func:`read_adapter_config`."""
    return config["_loralab"].get("task") or PEFT_TASKS.get(config.get("task_type") or "")


def parse_labels(data) -> tuple[str, ...]:
    """A label map as loralab or a user writes it: ``{"labels": [...]}``,
    ``{"id2label": {"0": ...}}``, a list, or ``{"0": name}``; ids must be 0..n-1."""
    if isinstance(data, dict) and "labels" in data:
        data = data["labels"]
    elif isinstance(data, dict) and "id2label" in data:
        data = data["id2label"]
    if isinstance(data, list):
        return tuple(str(x) for x in data)
    if isinstance(data, dict):
        try:
            ids = sorted(int(k) for k in data)
        except (TypeError, ValueError) as err:
            raise ValueError("label ids must be integers") from err
        if ids != list(range(len(ids))):
            raise ValueError("label ids must be 0..n-1")
        return tuple(str(data[str(i)] if str(i) in data else data[i]) for i in ids)
    raise ValueError(f"expected a list or an object, got {type(data).__name__}")


def adapter_labels(config: dict) -> tuple[str, ...] | None:
    """Label names of a classification adapter: its loralab.json, else the run's
    labels.json (inside the adapter dir or beside it); None if neither says."""
    labels = config["_loralab"].get("labels")
    if labels:
        return tuple(str(x) for x in labels)
    adapter_dir = Path(config["_dir"])
    for candidate in (adapter_dir / LABELS_NAME, adapter_dir.parent / LABELS_NAME):
        if candidate.is_file():
            try:
                return parse_labels(json.loads(candidate.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as err:
                raise LoralabError(f"{candidate} is not a valid label map ({err}).",
                                   hint="Fix: write it again with `loralab train`, or "
                                   "delete it to get LABEL_0..LABEL_n-1.") from err
    return None


def head_rows(config: dict) -> int | None:
    """Output count of the saved head, read from the weights' shapes: the class
    count of a classifier. A head is one Linear (``score``, BERT's
    ``classifier``) or a block ending in one (RoBERTa/ELECTRA's
    ``classifier.dense`` (H, H) then ``classifier.out_proj`` (C, H))."""
    from safetensors import SafetensorError, safe_open

    heads = tuple(config.get("modules_to_save") or ())
    path = Path(config["_dir"]) / WEIGHTS_NAME
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k.removeprefix(PREFIX): f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise LoralabError(f"{path} is corrupt or not a safetensors file ({err}).",
                           hint="Fix: save the adapter again.") from err
    for head in heads:
        own = {k: v for k, v in shapes.items()
               if k.startswith(head + ".") and k.endswith(".weight") and len(v) == 2}
        if not own:
            continue
        for key in (f"{head}.weight", f"{head}.out_proj.weight"):
            if key in own:
                return int(own[key][0])
        return int(min(v[0] for v in own.values()))
    return None


def classifier_labels(config: dict) -> tuple[str, ...]:
    """Label names of a classification adapter, checked against its head."""
    labels = adapter_labels(config)
    rows = head_rows(config)
    adapter_dir = config["_dir"]
    if rows is None and labels is None:
        raise LoralabError(f"classification adapter '{adapter_dir}' has no saved head and "
                           "no labels.", hint="Fix: train it with the head in modules_to_save "
                           "(loralab does this by default).")
    if labels is None:
        return tuple(f"LABEL_{i}" for i in range(rows))
    if rows is not None and rows != len(labels):
        raise LoralabError(f"adapter '{adapter_dir}': its labels name {len(labels)} classes "
                           f"but the saved head has {rows} outputs.",
                           hint="Fix: use the run's own labels.json.")
    return labels


def quantized_base(config: dict) -> bool:
    """True if the adapter was trained on an NF4 base (QLoRA): every command
    then runs it on that same 4-bit base, unless it is merged."""
    meta = config["_loralab"]
    return bool(meta.get("quantized")) or meta.get("method") == "qlora"


def load_base_and_adapter(adapter_dir, base: str | None = None, *, adapter_name="default",
                          quantize: bool | None = None, compute_dtype=None):
    """``(model, tokenizer, info)``: the base model the adapter was trained on
    (NF4 first for a QLoRA adapter, the task's model class, the label map) with
    the adapter loaded, active and in eval mode. The one loader behind merge,
    eval, generate, export, the lab and serve, so an adapter answers the same
    in every command. ``info``: base, task, quantized, adapter_dir, labels."""
    from loralab.models import load_model, quiet_transformers

    config = read_adapter_config(adapter_dir)
    adapter_dir = Path(config["_dir"])
    base = adapter_base(config, base)
    if not base:
        raise LoralabError(f"adapter '{adapter_dir}' does not say which base model it is for.",
                           hint="Fix: pass the base model (--base / --model).")
    task = adapter_task(config) or "sft"
    labels = classifier_labels(config) if task == "classify" else None
    quantized = quantized_base(config) if quantize is None else quantize
    if quantized and compute_dtype is None:  # as training's "auto": bf16 on GPUs that have it
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        compute_dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = {"id2label": dict(enumerate(labels))} if labels else {}
    with quiet_transformers():
        model, tok = load_model(base, task, quantize_4bit=quantized,
                                compute_dtype=compute_dtype, **kwargs)
    load_adapter(model, adapter_dir, adapter_name=adapter_name, config=config)
    model.eval()
    info = {"base": base, "task": task, "quantized": quantized, "adapter_dir": str(adapter_dir),
            "labels": list(labels) if labels else None}
    return model, tok, info


def _read_weights(adapter_dir: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(adapter_dir / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as err:
        raise LoralabError(
            f"{adapter_dir / WEIGHTS_NAME} is corrupt or not a safetensors file ({err}).",
            hint="Fix: save the adapter again.") from err


def _config_from_peft(config: dict, task: str | None) -> LoRAConfig:
    check_peft_config(config, config.get("_dir", "?"))  # never load without a variant
    targets = config.get("target_modules") or []
    if targets == PEFT_NO_TARGETS:
        targets = []
    elif isinstance(targets, str):
        targets = "re:" + targets
    return LoRAConfig(
        r=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
        dropout=float(config.get("lora_dropout", 0.0)), targets=targets,
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        # PiSSA/OLoRA in the residual form: the init is redone on the base, as peft does
        init_lora_weights=config.get("init_lora_weights", True),
        modules_to_save=list(config.get("modules_to_save") or []),
        task=task)


def _strip_key(key: str, adapter_name: str) -> str:
    key = key.removeprefix(PREFIX)
    # peft writes weights without the adapter name; tolerate ".default." variants.
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def load_adapter(model: nn.Module, adapter_dir, adapter_name: str = "default", *,
                 config: dict | None = None) -> nn.Module:
    """Inject an adapter saved by loralab or peft into ``model`` and load its weights
    (``config``: its :func:`read_adapter_config`, when already read)."""
    check_adapter_name(adapter_name)
    config = config or read_adapter_config(adapter_dir)
    adapter_dir = Path(config["_dir"])
    weights = {_strip_key(k, adapter_name): v for k, v in _read_weights(adapter_dir).items()}
    params = (find_target_parameters(model, config["target_parameters"])
              if config.get("target_parameters") else {})
    names = sorted({k.rsplit(".lora_", 1)[0] for k in weights if ".lora_A." in k}
                   - {n.removesuffix(".lora_A.weight") for n in _param_keys(model, params)})
    heads = [h for h in (config.get("modules_to_save") or [])
             if any(k.startswith(h + ".") for k in weights)]
    missing = [n for n in names + heads if not _has_module(model, n)]
    if missing:
        raise LoralabError(
            f"adapter '{adapter_dir}' does not fit this model: it has no module '{missing[0]}'.",
            hint="Fix: load the adapter onto the base model it was trained on "
            f"({config.get('base_model_name_or_path')}).")
    cfg = _config_from_peft(config, config["_loralab"].get("task"))
    cfg.modules_to_save = heads
    inject_lora(model, cfg, adapter_name, target_names=names, target_params=params)
    _load_tensors(model, weights, names, heads, adapter_name)
    model.loralab_adapters[adapter_name]["dir"] = str(adapter_dir)
    return model


def _param_keys(model: nn.Module, params: dict[str, list[str]]) -> set[str]:
    """The ``lora_A`` keys peft gives the parameter targets (nested ``base_layer``s)."""
    from loralab.lora.param import peft_prefixes

    return {f"{prefix}.lora_A.weight" for m, ps in params.items()
            for prefix in peft_prefixes(m, ps).values()}


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _load_tensors(model, weights: dict, names: list[str], heads: list[str], adapter_name: str):
    params = {}
    for n in names:
        layer = model.get_submodule(n)
        params[f"{n}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        params[f"{n}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            params[f"{n}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    for h in heads:
        for pname, p in model.get_submodule(h).modules_to_save[adapter_name].state_dict(
                keep_vars=True).items():
            params[f"{h}.{pname}"] = p
    params.update(param_tensors(model, adapter_name))
    unknown = sorted(k for k in weights if ".lora_" in k and k not in params)
    if unknown:
        raise LoralabError(f"adapter weights hold tensors loralab would ignore: {unknown[0]}"
                           + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "") + ".",
                           hint="Fix: load it with peft; its config does not announce them.")
    for key, target in params.items():
        if key not in weights:
            raise LoralabError(f"adapter weights lack '{key}'.",
                               hint="Fix: the adapter file is incomplete; save it again.")
        tensor = weights[key]
        if tuple(tensor.shape) != tuple(target.shape):
            module = key.rsplit(".", 1)[0]
            raise LoralabError(
                f"adapter does not fit this base: module '{module}' has shape "
                f"{tuple(tensor.shape)} in the adapter but {tuple(target.shape)} in the model.",
                hint="Fix: load it onto the base model (and label count) it was trained with.")
        with torch.no_grad():
            target.data.copy_(tensor.to(target.dtype))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and return a plain
    transformers model with no LoRA modules left. A QLoRA base is dequantized
    and the adapter merged into those float weights (what it was trained on)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, LoRAParam)):
            replace_module(model, name, module.unload(merge=True))
        elif isinstance(module, ModulesToSave):
            replace_module(model, name, module._module(module.active_adapter))
    for p in model.parameters():
        p.requires_grad_(False)
    model.__dict__.pop("loralab_adapters", None)
    dequantize_model(model)  # base layers the adapter did not touch
    return model


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_layers(model))
