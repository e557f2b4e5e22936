"""`loralab eval`: the training metrics for a saved model or adapter on any file.

Classification tables get accuracy/precision/recall/F1 with the label mapping
saved at training time; instruction data gets response-token loss and
perplexity; a plain ``.txt`` file gets perplexity over blocks of text.
"""

from __future__ import annotations

from pathlib import Path

from loralab.data.dataset import resolve_data_path
from loralab.data.encode import encode_classification, encode_conversations, encode_text_blocks
from loralab.data.instructions import read_conversations
from loralab.data.tables import read_table, read_text_file
from loralab.errors import LoralabError


def _adapter_meta(adapter: str | None) -> dict:
    if adapter is None:
        return {}
    from loralab.lora import read_adapter_config

    config = read_adapter_config(adapter)
    meta = dict(config.get("_loralab") or {})
    if not meta.get("task"):
        meta["task"] = {"SEQ_CLS": "classify", "CAUSAL_LM": "sft"}.get(config.get("task_type"))
    return meta


def _model_task(model: str) -> str:
    from loralab.models import load_config

    archs = getattr(load_config(model), "architectures", None) or []
    return "classify" if any(a.endswith("ForSequenceClassification") for a in archs) else "sft"


def _data_kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return "text"
    if suffix in (".json", ".jsonl"):
        from loralab.config import infer_task

        return infer_task(path)
    return "classify"


def _labels(model_obj, meta: dict) -> list[str]:
    if meta.get("labels"):
        return list(meta["labels"])
    id2label = getattr(model_obj.config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label, key=int)]


def _load(model: str, adapter: str | None, task: str, meta: dict):
    from loralab.models import load_model

    kwargs = {}
    if task == "classify" and meta.get("labels"):
        kwargs["id2label"] = dict(enumerate(meta["labels"]))
    quantized = bool(meta.get("quantized")) or meta.get("method") == "qlora"
    from loralab.train.methods import quiet_transformers

    with quiet_transformers():
        m, tok = load_model(model, task, quantize_4bit=quantized, **kwargs)
    if adapter is not None:
        from loralab.lora import load_adapter

        load_adapter(m, adapter)
    return m.eval(), tok


def _encode(kind: str, data: str, tok, labels, max_length: int, columns: tuple[str, str]):
    if kind == "text":
        return encode_text_blocks(tok, read_text_file(data), max_length)
    if kind == "sft":
        return encode_conversations(tok, read_conversations(data), max_length)
    table = read_table(data, *columns)
    unknown = sorted(set(table.labels) - set(labels))
    if unknown:
        raise LoralabError(f"label {unknown[0]!r} in {data} is unknown to the model (it knows: "
                           f"{', '.join(labels)}). Evaluate on data with the training labels.")
    ids = {lab: i for i, lab in enumerate(labels)}
    return encode_classification(tok, table.texts, [ids[x] for x in table.labels], max_length)


def evaluate_saved(model: str, data: str, adapter: str | None = None, *,
                   text_column: str = "text", label_column: str = "label",
                   max_length: int | None = None, batch_size: int = 16) -> dict:
    """Metrics of ``model`` (+ ``adapter``) on ``data``."""
    import torch
    from accelerate import Accelerator

    from loralab.train.evaluator import Evaluator
    from loralab.train.first_token import use_first_token_only

    data = resolve_data_path(data)
    read_text_file(data)  # missing, empty or non-UTF-8: one line, before loading a model
    meta = _adapter_meta(adapter)
    task = meta.get("task") or _model_task(model)
    kind = _data_kind(data)
    if kind == "classify" and task != "classify":
        raise LoralabError(f"{data} is a classification table but the model is a causal LM. "
                           "Give instruction data (.json/.jsonl) or plain text (.txt).")
    if kind in ("sft", "text") and task == "classify":
        raise LoralabError(f"{data} is {'instruction data' if kind == 'sft' else 'plain text'} "
                           "but the model is a classifier. Give a CSV/TSV/JSONL table.")
    length = max_length or meta.get("max_length") or (128 if task == "classify" else 512)
    m, tok = _load(model, adapter, task, meta)
    from loralab.train.run import max_positions

    length = min(length, max_positions(m) or length)
    labels = _labels(m, meta) if task == "classify" else None
    enc = _encode(kind, data, tok, labels, length, (text_column, label_column))
    if len(enc) == 0:
        raise LoralabError(f"{data} yields no example to evaluate. Check the file.")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    m = m.to(acc.device)
    use_first_token_only(m)  # only logits are read: the last layer runs for [CLS] alone
    metrics = Evaluator(m, acc, tok.pad_token_id, batch_size, labels).evaluate(enc)
    return {"model": model, "adapter": adapter, "data": data, "task": task,
            "kind": kind, "examples": len(enc), "metrics": metrics}

