"""Result rows: one per run, its ``metrics.json`` plus the lab's own fields.

A row is a plain dict so results.json stays readable and diffable:
``{**metrics, "run": name, "status": "ok"|"failed"|"skipped", "error": str|None,
"run_dir": str, "spec": {method, rank, alpha, lr, targets}}``. ``skipped`` means
the run had finished in an earlier invocation and was not redone: its metrics
are there. This module derives everything the table and the report show from
rows, so both say the same thing.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from loralab.lab import fmt

HAS_RESULTS = ("ok", "skipped")
SPEC_KEYS = ("method", "rank", "alpha", "lr", "targets", "variant")


@dataclass(frozen=True)
class Quality:
    """The headline quality metric of a comparison."""

    key: str  # key in the eval/test dict
    label: str  # as shown to a person
    higher_is_better: bool
    points: bool  # a fraction shown as percentage points (F1, accuracy)


F1 = Quality("f1", "F1", True, True)
ACCURACY = Quality("accuracy", "accuracy", True, True)
PERPLEXITY = Quality("perplexity", "perplexity", False, False)
EVAL_LOSS = Quality("loss", "eval loss", False, False)


def ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") in HAS_RESULTS]


def task_of(rows: list[dict]) -> str | None:
    return next((r.get("task") for r in rows if r.get("task")), None)


def metric_value(row: dict, key: str):
    """A metric from the test split, else from the eval split."""
    for split in ("test", "eval"):
        value = (row.get(split) or {}).get(key)
        if fmt.is_number(value):
            return value
    return None


def headline_quality(rows: list[dict]) -> Quality:
    """F1 for classification, perplexity for instruction tuning; falls back to
    whatever every finished run reports."""
    candidates = (F1, ACCURACY) if task_of(rows) == "classify" else (PERPLEXITY, EVAL_LOSS)
    done = ok_rows(rows)
    for quality in candidates:
        if done and all(metric_value(r, quality.key) is not None for r in done):
            return quality
    return candidates[0]


def spec_of(row: dict) -> dict:
    spec = dict(row.get("spec") or {})
    for key in SPEC_KEYS:
        if spec.get(key) is None and row.get(key) is not None:
            spec[key] = row[key]
    return spec


def varying_keys(rows: list[dict]) -> set[str]:
    """Spec keys (besides method) that differ between LoRA-family runs."""
    lora = [spec_of(r) for r in rows if spec_of(r).get("method") in ("lora", "qlora")]
    varying = {k for k in SPEC_KEYS[1:]
               if len({str(s[k]) for s in lora if s.get(k) is not None}) > 1}
    # alpha that follows the rank (alpha = 2r) is not a dimension of its own
    ratios = {s["alpha"] / s["rank"] for s in lora
              if fmt.is_number(s.get("alpha")) and fmt.is_number(s.get("rank")) and s["rank"]}
    if len(ratios) <= 1:
        varying.discard("alpha")
    return varying


def run_label(row: dict, varying: set[str] | None = None) -> str:
    """'full FT', 'LoRA r=8', 'LoRA r=8 α=16 all-linear' (only what varies)."""
    spec = spec_of(row)
    method = spec.get("method") or row.get("run") or "?"
    label = fmt.method_name(spec.get("variant") or method)  # DoRA, PiSSA, ... by name
    if method not in ("lora", "qlora"):
        return label
    parts = [label]
    if spec.get("rank") is not None:
        parts.append(f"r={spec['rank']}")
    varying = varying if varying is not None else set()
    if "alpha" in varying and spec.get("alpha") is not None:
        parts.append(f"α={fmt.number(spec['alpha'])}")
    if "targets" in varying and spec.get("targets") is not None:
        parts.append(str(spec["targets"]))
    if "lr" in varying and spec.get("lr") is not None:
        parts.append(f"lr={spec['lr']:g}" if fmt.is_number(spec["lr"]) else f"lr={spec['lr']}")
    return " ".join(parts)


def labels(rows: list[dict]) -> list[str]:
    """One label per row; rows that would share a label get their learning rate
    (e.g. two full fine-tunings at different rates), then their run name."""
    varying = varying_keys(rows)
    names = [run_label(r, varying) for r in rows]
    names = _disambiguate(names, [_lr_text(r) for r in rows])
    return _disambiguate(names, [f"({r.get('run')})" for r in rows])


def _lr_text(row: dict) -> str | None:
    lr = spec_of(row).get("lr")
    return f"lr={lr:g}" if fmt.is_number(lr) else None


def _disambiguate(names: list[str], extras: list[str | None]) -> list[str]:
    return [f"{n} {e}" if names.count(n) > 1 and e else n for n, e in zip(names, extras)]


def memory_breakdown(row: dict) -> dict | None:
    """Peak memory split into weights, gradients, optimizer state and the rest.

    'other' is the measured peak (process RSS on CPU, allocated on CUDA) minus
    the exact tensor account: activations, buffers, the framework itself."""
    peak = row.get("peak_memory") or {}
    tensors = peak.get("tensors") or {}
    measured = peak.get("peak_allocated_bytes") or peak.get("peak_rss_bytes")
    parts = {k: tensors.get(f"{k}_bytes") or 0 for k in ("weights", "gradients", "optimizer")}
    accounted = sum(parts.values())
    if not fmt.is_number(measured):
        measured = tensors.get("total_bytes") or (accounted or None)
    if measured is None:
        return None
    parts["other"] = max(0, measured - accounted)
    parts["peak"] = measured
    return parts


def reference_row(rows: list[dict]) -> dict | None:
    """The finished full fine-tuning run everything is compared against."""
    return next((r for r in ok_rows(rows) if spec_of(r).get("method") == "full"), None)


def _div(a, b):
    return a / b if fmt.is_number(a) and fmt.is_number(b) and b else None


def versus_full(row: dict, full: dict | None, quality: Quality) -> dict:
    """Ratios against full fine-tuning: parameter share, speed-up, memory share,
    artifact share and the quality difference (points for F1/accuracy)."""
    if full is None:
        return {}
    q, q_full = metric_value(row, quality.key), metric_value(full, quality.key)
    delta = q - q_full if q is not None and q_full is not None else None
    mem, mem_full = memory_breakdown(row), memory_breakdown(full)
    return {
        "params_ratio": _div(row.get("trainable_params"), full.get("trainable_params")),
        "speedup": _div(full.get("train_seconds"), row.get("train_seconds")),
        "memory_ratio": _div(mem and mem["peak"], mem_full and mem_full["peak"]),
        "artifact_ratio": _div(row.get("artifact_bytes"), full.get("artifact_bytes")),
        "quality_delta": delta * 100 if delta is not None and quality.points else delta,
        "quality_delta_percent": (_div(delta, q_full) or 0) * 100 if delta is not None else None,
    }


def quality_text(row: dict, quality: Quality) -> str:
    value = metric_value(row, quality.key)
    if value is None:
        return "—"
    return f"{value * 100:.1f}" if quality.points else fmt.number(value)


def secondary_text(row: dict, quality: Quality) -> str:
    """The other quality number: accuracy beside F1, eval loss beside perplexity."""
    other = {"f1": ACCURACY, "accuracy": F1, "perplexity": EVAL_LOSS,
             "loss": PERPLEXITY}[quality.key]
    value = quality_text(row, other)
    return "" if value == "—" else f"{other.label} {value}"


def delta_text(vs: dict, quality: Quality) -> str:
    delta = vs.get("quality_delta")
    if delta is None:
        return "—"
    if quality.points:
        return fmt.signed(delta, 1, "pt")
    return f"{fmt.signed(delta, 2)} ({fmt.signed(vs['quality_delta_percent'], 1)}%)"


def verdict(row: dict, full: dict | None, quality: Quality, label: str) -> str:
    """One line a person can act on, e.g. 'LoRA r=8: 0.6% of the parameters,
    2.9× faster, F1 −0.4 pt vs full FT'."""
    vs = versus_full(row, full, quality)
    parts = []
    if vs.get("params_ratio") is not None:
        parts.append(f"{fmt.percent(vs['params_ratio'] * 100, 2)} of the trainable parameters")
    elif fmt.is_number(row.get("trainable_percent")):
        parts.append(f"{fmt.percent(row['trainable_percent'], 2)} of the parameters trained")
    if vs.get("speedup") is not None:
        s = vs["speedup"]
        parts.append("about as fast" if 0.95 <= s <= 1.05 else
                     f"{fmt.ratio(s)} faster" if s > 1 else f"{fmt.ratio(1 / s)} slower")
    if vs.get("memory_ratio") is not None:
        m = vs["memory_ratio"]
        parts.append("about the same peak memory" if 0.95 <= m <= 1.05
                     else f"{fmt.ratio(m)} the peak memory")
    if vs.get("quality_delta") is not None:
        parts.append(f"{quality.label} {delta_text(vs, quality)} vs full FT")
    else:
        parts.append(f"{quality.label} {quality_text(row, quality)}")
    forgetting = row.get("forgetting") or {}
    if fmt.is_number(forgetting.get("percent")):
        parts.append(f"general-text perplexity {fmt.signed(forgetting['percent'], 1)}%")
    return f"{label}: " + ", ".join(parts)


CSV_FIELDS = (
    "run", "status", "method", "variant", "rank", "alpha", "lr", "targets", "trainable_params",
    "total_params", "trainable_percent", "train_seconds", "tokens_per_second", "peak_bytes",
    "weights_bytes", "gradients_bytes", "optimizer_bytes", "other_bytes", "artifact_bytes",
    "quality_metric", "quality", "accuracy", "f1", "eval_loss", "perplexity",
    "forgetting_before_ppl", "forgetting_after_ppl",
    "forgetting_percent", "params_ratio_vs_full", "speedup_vs_full", "memory_ratio_vs_full",
    "quality_delta_vs_full", "error",
)


def csv_row(row: dict, full: dict | None, quality: Quality) -> dict:
    spec, mem = spec_of(row), memory_breakdown(row) or {}
    vs, forgetting = versus_full(row, full, quality), row.get("forgetting") or {}
    return {
        "run": row.get("run"), "status": row.get("status"), **{k: spec.get(k) for k in SPEC_KEYS},
        **{k: row.get(k) for k in ("trainable_params", "total_params", "trainable_percent",
                                     "train_seconds", "tokens_per_second", "artifact_bytes")},
        "peak_bytes": mem.get("peak"),
        **{f"{k}_bytes": mem.get(k) for k in ("weights", "gradients", "optimizer", "other")},
        "quality_metric": quality.key, "quality": metric_value(row, quality.key),
        "accuracy": metric_value(row, "accuracy"), "f1": metric_value(row, "f1"),
        "eval_loss": metric_value(row, "loss"), "perplexity": metric_value(row, "perplexity"),
        "forgetting_before_ppl": forgetting.get("before_ppl"),
        "forgetting_after_ppl": forgetting.get("after_ppl"),
        "forgetting_percent": forgetting.get("percent"),
        "params_ratio_vs_full": vs.get("params_ratio"), "speedup_vs_full": vs.get("speedup"),
        "memory_ratio_vs_full": vs.get("memory_ratio"),
        "quality_delta_vs_full": vs.get("quality_delta"), "error": row.get("error"),
    }


def to_csv(rows: list[dict]) -> str:
    quality, full = headline_quality(rows), reference_row(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in
                         csv_row(row, full, quality).items()})
    return buf.getvalue()
