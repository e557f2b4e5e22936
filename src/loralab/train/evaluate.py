"""`loralab eval`: the training metrics for a saved model or adapter on any file.

Classification tables get accuracy/precision/recall/F1 with the label mapping
saved at training time; instruction data gets response-token loss and
perplexity; a plain ``.txt`` file gets perplexity over blocks of text.
"""

from __future__ import annotations

from loralab.data.dataset import resolve_data_path
from loralab.data.documents import read_documents
from loralab.data.encode import encode_classification, encode_conversations, encode_documents
from loralab.data.instructions import read_conversations
from loralab.data.sources import source_kind
from loralab.data.tables import read_table, read_text_file
from loralab.errors import LoralabError


def _model_task(model: str) -> str:
    from loralab.models import default_task, load_config

    return default_task(load_config(model))


def _data_kind(path: str, text_column: str = "text") -> str:
    """classify, sft or text (lm), told from the data as training tells it."""
    from loralab.config import infer_task

    kind = infer_task(path, {"text_column": text_column})
    return "text" if kind == "lm" else kind


def _labels(model_obj) -> list[str]:
    id2label = getattr(model_obj.config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label, key=int)]


def _load(model: str, adapter: str | None, task: str):
    """The model to evaluate and its tokenizer; an adapter comes through the one
    loader (its own task, labels and, for QLoRA, the NF4 base)."""
    from loralab.models import load_model, quiet_transformers

    if adapter is not None:
        from loralab.lora.adapters import load_base_and_adapter

        m, tok, _ = load_base_and_adapter(adapter, model)
        return m, tok
    with quiet_transformers():
        m, tok = load_model(model, task)
    return m.eval(), tok


def _encode(kind: str, data: str, tok, labels, max_length: int, columns: tuple[str, str]):
    if kind == "text":
        docs = read_documents(data, {"text_column": columns[0]})
        return encode_documents(tok, docs, max_length)
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
    if source_kind(data) not in ("parquet", "disk", "hub"):
        read_text_file(data)  # missing, empty or non-UTF-8: one line, before loading a model
    meta = {}
    if adapter is not None:
        from loralab.lora.adapters import adapter_task, read_adapter_config

        config = read_adapter_config(adapter)
        meta = dict(config["_loralab"], task=adapter_task(config))
    task = meta.get("task") or _model_task(model)
    kind = _data_kind(data, text_column)
    if kind == "classify" and task != "classify":
        raise LoralabError(f"{data} is a classification table but the model is a causal LM. "
                           "Give instruction data (.json/.jsonl) or plain text (.txt).")
    if kind in ("sft", "text") and task == "classify":
        raise LoralabError(f"{data} is {'instruction data' if kind == 'sft' else 'plain text'} "
                           "but the model is a classifier. Give a CSV/TSV/JSONL table.")
    length = max_length or meta.get("max_length") or (128 if task == "classify" else 512)
    m, tok = _load(model, adapter, task)
    from loralab.models import context_length

    length = min(length, context_length(m) or length)
    labels = _labels(m) if task == "classify" else None
    enc = _encode(kind, data, tok, labels, length, (text_column, label_column))
    if len(enc) == 0:
        raise LoralabError(f"{data} yields no example to evaluate. Check the file.")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    m = m.to(acc.device)
    use_first_token_only(m)  # only logits are read: the last layer runs for [CLS] alone
    metrics = Evaluator(m, acc, tok.pad_token_id, batch_size, labels).evaluate(enc)
    return {"model": model, "adapter": adapter, "data": data, "task": task,
            "kind": kind, "examples": len(enc), "metrics": metrics}

