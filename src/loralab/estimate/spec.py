"""The model being estimated: its config, and the model built on the meta device.

``--model`` is a preset (``loralab.estimate.presets``, the loralab aliases
included), a local model dir or ``config.json``, or a hub id (config only).
Building with ``torch.device("meta")`` gives every parameter's exact shape
while allocating no weight memory, so a 70B model is counted in a second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError
from loralab.estimate.presets import PRESETS
from loralab.models import build_meta_model, default_task, is_decoder

TASKS = ("classify", "sft", "lm")

# raw config.json keys the formula needs, per model_type (first spelling wins)
_DECODER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "vocab_size")
REQUIRED_KEYS = {
    "llama": _DECODER_KEYS, "mistral": _DECODER_KEYS, "qwen2": _DECODER_KEYS,
    "qwen3": _DECODER_KEYS, "bert": _DECODER_KEYS, "roberta": _DECODER_KEYS,
    "xlm-roberta": _DECODER_KEYS, "electra": _DECODER_KEYS, "deberta-v2": _DECODER_KEYS,
    "modernbert": _DECODER_KEYS, "gemma2": _DECODER_KEYS, "gemma3_text": _DECODER_KEYS,
    "phi3": _DECODER_KEYS, "olmo2": _DECODER_KEYS,
    "qwen3_moe": _DECODER_KEYS,  # num_experts is saved as num_local_experts: read on the config
    "distilbert": ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"),
    "gpt2": ("n_embd", "n_layer", "n_head", "vocab_size"),
}


@dataclass
class ModelSpec:
    name: str  # what the user gave
    source: str  # "preset" | "local" | "hub"
    hub_id: str  # the publisher's hub id (presets), the config path, or the hub id given
    config: object  # transformers.PretrainedConfig
    task: str  # "classify" | "sft"
    num_labels: int
    model: object  # the model on the meta device
    checkpoint_bytes: int = 4  # bytes per weight in the checkpoint files (config's dtype)

    @property
    def model_type(self) -> str:
        return self.config.model_type


def _presets_hint() -> str:
    return "known presets: " + ", ".join(PRESETS)


def raw_config(name: str) -> tuple[dict, str, str]:
    """``(config.json fields, source, hub id)`` for a preset, path or hub id."""
    from loralab.models import ALIASES, cached_snapshot, parse_hub_id, resolve_config_dir

    if name in PRESETS:
        hub_id, fields = PRESETS[name]
        return copy.deepcopy(fields), "preset", hub_id
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return _read_json(path), "local", str(path)
    if name.endswith(".json") or name.startswith((".", "/", "~")):
        raise LoralabError(f"no model config at '{name}'.",
                           hint="Fix: give a model dir holding config.json, a config.json, "
                           "or a preset (" + _presets_hint() + ").")
    if name in ALIASES:
        return _read_json(Path(resolve_config_dir(name)) / "config.json"), "local", name
    repo, revision = parse_hub_id(name)
    if "/" not in repo and not cached_snapshot(repo, revision):
        raise LoralabError(f"unknown model preset '{name}'.",
                           hint="Fix: use a hub id (org/name), a local dir, or one of the "
                           + _presets_hint() + ".")
    try:
        found = resolve_config_dir(name)
    except LoralabError as err:
        raise LoralabError(err.message, hint=f"{err.hint} Or estimate a preset ("
                           + _presets_hint() + ").") from err
    return _read_json(Path(found) / "config.json"), "hub", repo


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoralabError(f"cannot read {path}: {err}.",
                           hint="Fix: point --model at a valid config.json.") from err
    if not isinstance(data, dict):
        raise LoralabError(f"{path} is not a JSON object.",
                           hint="Fix: point --model at a Hugging Face config.json.")
    return data


def check_fields(raw: dict, name: str) -> str:
    """The model_type, after checking that the fields the formula needs are there."""
    mtype = raw.get("model_type")
    if not mtype:
        raise LoralabError(f"the config of '{name}' has no model_type.",
                           hint="Fix: add \"model_type\" (e.g. \"llama\") to its config.json.")
    if mtype not in REQUIRED_KEYS:
        raise LoralabError(
            f"no activation formula for architecture '{mtype}' yet.",
            hint="Fix: use a model of type " + ", ".join(REQUIRED_KEYS) + ".")
    missing = [k for k in REQUIRED_KEYS[mtype] if raw.get(k) in (None, 0)]
    if missing:
        raise LoralabError(
            f"the config of '{name}' lacks {', '.join(missing)}, which the estimate needs.",
            hint="Fix: add the field(s) to config.json as the model's publisher gives them.")
    return mtype


def _facts(raw: dict):
    """The fields of a raw config.json that loralab.models' facts read."""
    from types import SimpleNamespace

    return SimpleNamespace(model_type=raw.get("model_type"),
                           architectures=raw.get("architectures"),
                           is_decoder=raw.get("is_decoder", False))


def load_spec(name: str, task: str | None = None, num_labels: int = 2) -> ModelSpec:
    """Resolve ``name`` and build its model on the meta device for ``task``."""
    raw, source, hub_id = raw_config(name)
    mtype = check_fields(raw, name)
    task = task or default_task(_facts(raw))
    if task not in TASKS:
        raise LoralabError(f"unknown task '{task}'.",
                           hint="Fix: use --task classify, sft or lm.")
    if task in ("sft", "lm") and not is_decoder(_facts(raw)):
        raise LoralabError(f"'{name}' is an encoder ({mtype}); it does not generate text.",
                           hint=f"Fix: use --task classify, or a decoder model for {task}.")
    if num_labels < 1:
        raise LoralabError(f"num_labels must be >= 1 (got {num_labels}).",
                           hint="Fix: pass --num-labels 2, for example.")
    config = _build_config(raw, task, num_labels)
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    return ModelSpec(name, source, hub_id, config, task, num_labels,
                     build_meta_model(config, task),
                     checkpoint_bytes=2 if dtype in ("bfloat16", "float16") else 4)


def _build_config(raw: dict, task: str, num_labels: int):
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if not k.startswith("_") and k != "model_type"}
    fields.pop("transformers_version", None)
    if task == "classify":
        fields["num_labels"] = num_labels
        fields.pop("id2label", None)
        fields.pop("label2id", None)
    try:
        return AutoConfig.for_model(raw["model_type"], **fields)
    except (TypeError, ValueError) as err:
        raise LoralabError(f"invalid config for {raw['model_type']}: {err}.",
                           hint="Fix: check the config.json fields.") from err
