"""What an adapter directory holds, checked before it touches the model.

An adapter is a PEFT-format directory (``adapter_config.json`` +
``adapter_model.safetensors``), or a ``loralab train`` run directory with one in
``adapter/``. Its ``task_type`` says whether it generates (``CAUSAL_LM``) or
classifies (``SEQ_CLS``); a classifier's label names come from the run's
``labels.json`` (next to ``adapter/`` or inside it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
HEAD_NAMES = ("score", "classifier")  # sequence-classification heads (Llama/BERT families)


@dataclass(frozen=True)
class AdapterInfo:
    dir: Path  # the PEFT-format directory itself
    task: str  # "generate" | "classify"
    labels: tuple[str, ...] | None  # classify: label name per class id
    base_model: str | None  # base_model_name_or_path recorded in the adapter
    config: dict


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LoralabError(
            f"adapter name {name!r} is not allowed.",
            hint="Use 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit.",
        )
    return name


def within_root(path: Path, root: Path) -> bool:
    """True if ``path`` (symlinks resolved) lies inside ``root``."""
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def _read_labels(adapter_dir: Path) -> tuple[str, ...] | None:
    for candidate in (adapter_dir / "labels.json", adapter_dir.parent / "labels.json"):
        if candidate.is_file():
            try:
                return _parse_labels(json.loads(candidate.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as err:
                raise LoralabError(f"{candidate} is not a valid label map ({err}).",
                                   hint="Write it again with `loralab train`.") from err
    return None


def _parse_labels(data) -> tuple[str, ...]:
    """``{"labels": [...]}``, ``{"id2label": {"0": ...}}``, a list, or ``{"0": name}``."""
    if isinstance(data, dict) and "labels" in data:
        data = data["labels"]
    elif isinstance(data, dict) and "id2label" in data:
        data = data["id2label"]
    if isinstance(data, list):
        return tuple(str(x) for x in data)
    if isinstance(data, dict):
        ids = sorted(int(k) for k in data)
        if ids != list(range(len(ids))):
            raise ValueError("label ids must be 0..n-1")
        return tuple(str(data[str(i)] if str(i) in data else data[i]) for i in ids)
    raise ValueError(f"expected a list or an object, got {type(data).__name__}")


def _head_size(adapter_dir: Path, config: dict) -> int | None:
    """Number of classes from the saved head's weight, e.g. ``score.weight`` (C, H)."""
    from safetensors import safe_open

    heads = tuple(config.get("modules_to_save") or ()) or HEAD_NAMES
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in list(f.keys()):
            module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
            if key.endswith(".weight") and module.split(".")[-1] in heads:
                return int(f.get_slice(key).get_shape()[0])
    return None


def inspect_adapter(path) -> AdapterInfo:
    """Read and check an adapter directory (or a run dir holding ``adapter/``)."""
    from safetensors import SafetensorError

    from loralab.lora import read_adapter_config

    config = read_adapter_config(Path(path))
    adapter_dir = Path(config["_dir"])
    task_type = config.get("task_type") or ""
    if task_type != "SEQ_CLS":
        return AdapterInfo(adapter_dir, "generate", None, config.get("base_model_name_or_path"),
                           config)
    labels = _read_labels(adapter_dir)
    try:
        size = _head_size(adapter_dir, config)
    except (SafetensorError, OSError) as err:
        raise LoralabError(f"{adapter_dir} holds unreadable weights ({err}).",
                           hint="Save the adapter again.") from err
    if size is None:
        raise LoralabError(f"classification adapter {adapter_dir} has no saved head.",
                           hint="Train it with modules_to_save including the head.")
    if labels is None:
        labels = tuple(f"LABEL_{i}" for i in range(size))
    if len(labels) != size:
        raise LoralabError(f"{adapter_dir}: labels.json names {len(labels)} labels but the "
                           f"head has {size} outputs.", hint="Use the run's own labels.json.")
    return AdapterInfo(adapter_dir, "classify", labels, config.get("base_model_name_or_path"),
                       config)
