"""What an adapter directory holds, checked before it touches the model.

An adapter is a PEFT-format directory (``adapter_config.json`` +
``adapter_model.safetensors``), or a ``loralab train`` run directory with one in
``adapter/``. Every fact about it is read by the one home for adapter facts,
:mod:`loralab.lora.adapters`, as ``loralab eval``, ``merge`` and ``generate``
read it: the task (``task_type`` / ``loralab.json``), a classifier's labels,
checked against its saved head whatever the head's shape (``score``, BERT's
``classifier``, RoBERTa/ELECTRA's ``classifier.dense`` + ``classifier.out_proj``),
and whether it was trained on an NF4 base (QLoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError


@dataclass(frozen=True)
class AdapterInfo:
    dir: Path  # the PEFT-format directory itself
    task: str  # "generate" | "classify"
    labels: tuple[str, ...] | None  # classify: label name per class id
    base_model: str | None  # base model recorded in the adapter
    config: dict  # as read by loralab.lora.adapters.read_adapter_config
    quantized: bool = False  # trained on the NF4 base (QLoRA): served on it


def within_root(path: Path, root: Path) -> bool:
    """True if ``path`` (symlinks resolved) lies inside ``root``."""
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def inspect_adapter(path) -> AdapterInfo:
    """Read and check an adapter directory (or a run dir holding ``adapter/``)."""
    from loralab.lora.adapters import (
        adapter_base,
        adapter_task,
        classifier_labels,
        head_rows,
        quantized_base,
        read_adapter_config,
    )

    config = read_adapter_config(Path(path))
    classify = adapter_task(config) == "classify"
    if classify and head_rows(config) is None:  # the server has no trained head without it
        raise LoralabError(f"classification adapter {config['_dir']} has no saved head.",
                           hint="Fix: train it with the head in modules_to_save "
                           "(loralab does this by default).")
    base = adapter_base(config)
    return AdapterInfo(Path(config["_dir"]), "classify" if classify else "generate",
                       classifier_labels(config) if classify else None, base, config,
                       quantized_base(config))
