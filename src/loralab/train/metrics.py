"""Quality metrics: classification scores and language-model perplexity."""

from __future__ import annotations

import math


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str],
                           loss: float | None = None) -> dict:
    """Accuracy, precision, recall, F1 (binary for 2 classes, macro for more),
    a per-class report and the confusion matrix (rows: true, columns: predicted)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    binary = len(labels) == 2
    # binary scores are for the second label (id 1: 'spam' of ham/spam, '1' of 0/1)
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average="binary" if binary else "macro",
        pos_label=1, zero_division=0)
    pc, rc, fc, sc = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average=None, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(p), "recall": float(r), "f1": float(f),
        "average": "binary" if binary else "macro",
        "per_class": {lab: {"precision": float(pc[i]), "recall": float(rc[i]),
                            "f1": float(fc[i]), "support": int(sc[i])}
                      for i, lab in enumerate(labels)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "n": len(y_true),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


def lm_metrics(loss_sum: float, n_tokens: int) -> dict:
    """Token-averaged cross-entropy and its exponential, the perplexity."""
    loss = loss_sum / max(n_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n_tokens}
