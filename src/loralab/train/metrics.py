"""Quality metrics: classification scores and language-model perplexity, each
with its 95 % bootstrap interval and (classification) the constant-answer
baseline it must clear (``loralab.stats``)."""

from __future__ import annotations

import math

from loralab import stats


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str],
                           loss: float | None = None) -> dict:
    """Accuracy, precision, recall, F1 (binary for 2 classes, macro for more),
    a per-class report and the confusion matrix (rows: true, columns: predicted);
    each score's bootstrap ``interval``, the ``baseline`` of always answering one
    class, ``at_chance`` (F1's interval reaches that baseline) and the per-row
    ``predictions``/``targets`` the lab pairs methods on."""
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
    return dict(out, **_uncertainty(y_true, y_pred, labels))


def _uncertainty(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    k = len(labels)
    interval = stats.classification_intervals(y_true, y_pred, k)
    baseline = stats.majority_baseline(y_true, k) if len(y_true) else {}
    if baseline:
        baseline["class"] = labels[baseline["class"]]
    return {"interval": interval, "baseline": baseline,
            "at_chance": bool(baseline) and stats.at_chance(interval.get("f1"), baseline["f1"]),
            # the class binary precision/recall/F1 are for (macro F1 has none)
            "positive_label": labels[1] if k == 2 else None,
            "predictions": [int(p) for p in y_pred], "targets": [int(t) for t in y_true]}


def lm_metrics(loss_sum: float, n_tokens: int, loss_sums: list[float] | None = None,
               token_counts: list[int] | None = None) -> dict:
    """Token-averaged cross-entropy and its exponential, the perplexity; with the
    per-example sums and token counts, the perplexity's bootstrap interval."""
    loss = loss_sum / max(n_tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n_tokens}
    ppl = stats.perplexity_interval(loss_sums, token_counts) if loss_sums else None
    if ppl is not None:
        out["interval"] = {"perplexity": ppl}
    return out
