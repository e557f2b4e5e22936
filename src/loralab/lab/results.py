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
import re
import statistics
from dataclasses import dataclass

from loralab import stats
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


def split_of(row: dict, key: str) -> dict:
    """The split dict ``metric_value`` reads ``key`` from (test, else eval)."""
    for split in ("test", "eval"):
        scores = row.get(split) or {}
        if fmt.is_number(scores.get(key)):
            return scores
    return {}


def interval(row: dict, quality: Quality) -> list[float] | None:
    """The 95 % bootstrap interval of the quality figure, in its own units."""
    found = (split_of(row, quality.key).get("interval") or {}).get(quality.key)
    return found if isinstance(found, list) and len(found) == 2 else None


def _scaled(x: float, quality: Quality) -> float:
    return x * 100 if quality.points else x


def shown_interval(row: dict, quality: Quality) -> tuple[float, float] | None:
    """The 95 % interval in the units tables and charts show (points for F1/accuracy)."""
    found = interval(row, quality)
    return None if found is None else (_scaled(found[0], quality), _scaled(found[1], quality))


def interval_text(row: dict, quality: Quality) -> str:
    """'95% 88.1–93.4' (points for F1/accuracy), '' when the run has none."""
    found = shown_interval(row, quality)
    if found is None:
        return ""
    lo, hi = found
    if quality.points:
        return f"95% {lo:.1f}–{hi:.1f}"
    return f"95% {fmt.number(lo)}–{fmt.number(hi)}"


def at_chance(row: dict) -> bool:
    """The run's F1 interval reaches the constant-answer baseline: nothing it
    learned can be told from always answering one class."""
    scores = split_of(row, "f1")
    if "at_chance" in scores:
        return bool(scores["at_chance"])
    f1 = (scores.get("interval") or {}).get("f1")
    base = (scores.get("baseline") or {}).get("f1")
    return fmt.is_number(base) and stats.at_chance(f1, base)


AT_CHANCE = "at chance — not learned"


def positive_label(rows: list[dict]) -> str | None:
    """The class a binary precision/recall/F1 is for (labels[1])."""
    return next((split_of(r, "f1").get("positive_label") for r in ok_rows(rows)
                 if split_of(r, "f1").get("positive_label")), None)


def quality_header(rows: list[dict], quality: Quality) -> str:
    """'F1 (class spam)' for a binary F1, else the metric's label."""
    positive = positive_label(rows) if quality.key == "f1" else None
    return f"{quality.label} (class {positive})" if positive else quality.label


def baseline(rows: list[dict], quality: Quality) -> dict | None:
    """The reference row every run must clear: the constant answer's scores
    (classify), or the base model's general-text perplexity before fine-tuning
    (sft/lm, where a run measured forgetting)."""
    done = ok_rows(rows)
    for row in done:
        base = split_of(row, quality.key).get("baseline") or {}
        if fmt.is_number(base.get(quality.key)):
            return {"name": "baseline",
                    "detail": (f"one constant answer, the best for each score "
                               f"(accuracy: always '{base.get('class')}')"),
                    "scores": base}
    before = [(r.get("forgetting") or {}).get("before_ppl") for r in done]
    before = next((b for b in before if fmt.is_number(b)), None)
    if before is not None:
        return {"name": "baseline",
                "detail": "the base model before fine-tuning (general-text perplexity)",
                "before_ppl": before}
    return None


def baseline_text(base: dict, quality: Quality) -> str:
    """The baseline's figure in the quality column ('—' when not measured)."""
    value = (base.get("scores") or {}).get(quality.key)
    if not fmt.is_number(value):
        return "—"
    return f"{value * 100:.1f}" if quality.points else fmt.number(value)


def quality_difference(row: dict, full: dict, quality: Quality) -> dict | None:
    """``row - full`` in the quality's units with a 95 % interval and the verdict
    words: paired bootstrap on the same test rows where both runs kept their
    predictions, else two independent intervals combined (normal approximation),
    else None."""
    a, b = split_of(row, quality.key), split_of(full, quality.key)
    if not a or not b or row is full:
        return None
    paired = (quality.key in ("f1", "accuracy", "precision", "recall")
              and a.get("predictions") and b.get("predictions")
              and a.get("targets") is not None and a.get("targets") == b.get("targets")
              and len(a["predictions"]) == len(b["predictions"]) == len(a["targets"]))
    if paired:
        k = len(a.get("per_class") or {}) or max(a["targets"] + a["predictions"]
                                                 + b["predictions"]) + 1
        d = stats.paired_difference(a["targets"], a["predictions"], b["predictions"], k,
                                    quality.key)
        diff, (lo, hi) = d["difference"], d["interval"]
    else:
        ia, ib = interval(row, quality), interval(full, quality)
        if ia is None or ib is None:
            return None
        diff = a[quality.key] - b[quality.key]
        half = ((ia[1] - ia[0]) ** 2 + (ib[1] - ib[0]) ** 2) ** 0.5 / 2
        lo, hi = diff - half, diff + half
    words = stats.verdict(lo, hi) if quality.higher_is_better else stats.verdict(-hi, -lo)
    return {"difference": _scaled(diff, quality),
            "interval": [_scaled(lo, quality), _scaled(hi, quality)],
            "verdict": words, "paired": bool(paired)}


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


# the parts of memory_breakdown, in the order they stack (the last is the remainder)
MEMORY_PARTS = ("weights", "gradients", "optimizer", "process_baseline", "mapped_checkpoint",
                "other")
MEMORY_LABELS = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer",
                 "process_baseline": "process baseline", "mapped_checkpoint": "mapped checkpoint",
                 "other": "other: activations, allocator"}


def memory_breakdown(row: dict) -> dict | None:
    """Peak memory split into weights, gradients, optimizer state and the rest.

    On CPU two more parts of the rest are measured, not estimated: the process
    baseline (its resident memory before the model loaded: interpreter,
    libraries, the data) and the memory-mapped checkpoint pages still resident
    at the end (QLoRA quantizes from that map). 'other' is what remains of the
    measured peak (process RSS on CPU, allocated on CUDA): activations at the
    peak, the allocator's kept and fragmented blocks, buffers."""
    peak = row.get("peak_memory") or {}
    tensors = peak.get("tensors") or {}
    measured = peak.get("peak_allocated_bytes") or peak.get("peak_rss_bytes")
    parts = {k: tensors.get(f"{k}_bytes") or 0 for k in ("weights", "gradients", "optimizer")}
    accounted = sum(parts.values())
    if not fmt.is_number(measured):
        measured = tensors.get("total_bytes") or (accounted or None)
    if measured is None:
        return None
    for key in ("process_baseline", "mapped_checkpoint"):
        value = peak.get(f"{key}_bytes")
        if fmt.is_number(value) and peak.get("peak_rss_bytes"):
            parts[key] = max(0, min(int(value), measured - accounted))
            accounted += parts[key]
    parts["other"] = max(0, measured - accounted)
    parts["peak"] = measured
    return parts


def reference_row(rows: list[dict]) -> dict | None:
    """The finished full fine-tuning run everything is compared against."""
    return next((r for r in ok_rows(rows) if spec_of(r).get("method") == "full"), None)


def reference_for(row: dict, rows: list[dict]) -> dict | None:
    """The full fine-tuning run ``row`` is judged against: the one at its seed
    under ``compare --seeds N`` (same split, so the difference is paired), else
    the reference row."""
    same = [r for r in ok_rows(rows) if spec_of(r).get("method") == "full"
            and r.get("seed") == row.get("seed")]
    return same[0] if same else reference_row(rows)


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
        "quality_difference": quality_difference(row, full, quality),
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


def _delta_number(vs: dict, quality: Quality) -> str:
    delta = vs.get("quality_delta")
    if delta is None:
        return "—"
    if quality.points:
        return fmt.signed(delta, 1, "pt")
    return f"{fmt.signed(delta, 2)} ({fmt.signed(vs['quality_delta_percent'], 1)}%)"


def difference_words(vs: dict) -> str:
    """The verdict on the difference to full FT: 'better', 'worse', 'not
    distinguishable at this test size', '' when no interval was recorded."""
    return (vs.get("quality_difference") or {}).get("verdict", "")


def delta_text(vs: dict, quality: Quality) -> str:
    """'+1.7 pt, not distinguishable at this test size', '+5.2 pt, better'."""
    words = difference_words(vs)
    number = _delta_number(vs, quality)
    return f"{number}, {words}" if words and number != "—" else number


def difference_interval_text(vs: dict, quality: Quality) -> str:
    """'95% −2.1 to +5.3 pt (paired)' for the difference to full FT."""
    d = vs.get("quality_difference")
    if not d:
        return ""
    digits, unit = (1, "pt") if quality.points else (2, "")
    lo, hi = (fmt.signed(x, digits, unit if i else "") for i, x in enumerate(d["interval"]))
    how = "paired" if d["paired"] else "unpaired"
    return f"95% {lo} to {hi} ({how})"


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
        words = difference_words(vs)
        parts.append(f"{quality.label} {_delta_number(vs, quality)} vs full FT"
                     + (f", {words}" if words else ""))
    else:
        parts.append(f"{quality.label} {quality_text(row, quality)}")
    if at_chance(row):
        parts.append(AT_CHANCE)
    forgetting = row.get("forgetting") or {}
    if fmt.is_number(forgetting.get("percent")):
        parts.append(f"general-text perplexity {fmt.signed(forgetting['percent'], 1)}%")
    return f"{label}: " + ", ".join(parts)


CSV_FIELDS = (
    "run", "status", "method", "variant", "rank", "alpha", "lr", "targets", "trainable_params",
    "total_params", "trainable_percent", "train_seconds", "tokens_per_second", "peak_bytes",
    "weights_bytes", "gradients_bytes", "optimizer_bytes", "process_baseline_bytes",
    "mapped_checkpoint_bytes", "other_bytes", "artifact_bytes",
    "quality_metric", "quality", "accuracy", "f1", "eval_loss", "perplexity",
    "forgetting_before_ppl", "forgetting_after_ppl",
    "forgetting_percent", "params_ratio_vs_full", "speedup_vs_full", "memory_ratio_vs_full",
    "quality_delta_vs_full", "quality_low", "quality_high", "at_chance",
    "quality_verdict_vs_full", "error",
)


def csv_row(row: dict, full: dict | None, quality: Quality) -> dict:
    spec, mem = spec_of(row), memory_breakdown(row) or {}
    vs, forgetting = versus_full(row, full, quality), row.get("forgetting") or {}
    return {
        "run": row.get("run"), "status": row.get("status"), **{k: spec.get(k) for k in SPEC_KEYS},
        **{k: row.get(k) for k in ("trainable_params", "total_params", "trainable_percent",
                                     "train_seconds", "tokens_per_second", "artifact_bytes")},
        "peak_bytes": mem.get("peak"),
        **{f"{k}_bytes": mem.get(k) for k in MEMORY_PARTS},
        "quality_metric": quality.key, "quality": metric_value(row, quality.key),
        "accuracy": metric_value(row, "accuracy"), "f1": metric_value(row, "f1"),
        "eval_loss": metric_value(row, "loss"), "perplexity": metric_value(row, "perplexity"),
        "forgetting_before_ppl": forgetting.get("before_ppl"),
        "forgetting_after_ppl": forgetting.get("after_ppl"),
        "forgetting_percent": forgetting.get("percent"),
        "params_ratio_vs_full": vs.get("params_ratio"), "speedup_vs_full": vs.get("speedup"),
        "memory_ratio_vs_full": vs.get("memory_ratio"),
        "quality_delta_vs_full": vs.get("quality_delta"),
        **dict(zip(("quality_low", "quality_high"), interval(row, quality) or (None, None))),
        "at_chance": at_chance(row) if quality.key in ("f1", "accuracy") else None,
        "quality_verdict_vs_full": difference_words(vs) or None, "error": row.get("error"),
    }


def caveats(rows: list[dict]) -> list[str]:
    """The data's caveats each run recorded (metrics.json data.caveats, the
    words ``loralab train`` printed), once each, in order."""
    seen: dict[str, None] = {}
    for row in ok_rows(rows):
        for line in (row.get("data") or {}).get("caveats") or []:
            seen.setdefault(str(line), None)
    return list(seen)


def seed_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished runs of ``compare --seeds N`` by method: 'lora-r8-s42' and
    'lora-r8-s43' are one group 'lora-r8' (the suffix matches the run's seed)."""
    groups: dict[str, list[dict]] = {}
    for row in ok_rows(rows):
        name = str(row.get("run"))
        base = re.sub(rf"-s{row.get('seed')}$", "", name)
        if base != name:
            groups.setdefault(base, []).append(row)
    return {k: v for k, v in groups.items() if len(v) > 1}


def seed_summary(rows: list[dict], quality: Quality) -> dict | None:
    """Mean ± spread (sample standard deviation) of the quality over seeds per
    method, and which varies more: the seeds within a method (the mean of those
    spreads) or the methods (the spread of their means)."""
    groups = {}
    for base, members in seed_groups(rows).items():
        values = [metric_value(r, quality.key) for r in members]
        values = [_scaled(v, quality) for v in values if v is not None]
        if len(values) > 1:
            groups[base] = {"label": run_label(members[0], varying_keys(rows)),
                            "mean": statistics.fmean(values), "spread": statistics.stdev(values),
                            "seeds": sorted(r.get("seed") for r in members), "values": values}
    if not groups:
        return None
    seeds = statistics.fmean(g["spread"] for g in groups.values())
    methods = (statistics.stdev(g["mean"] for g in groups.values()) if len(groups) > 1
               else None)
    more = None if methods is None else ("seeds" if seeds >= methods else "methods")
    return {"groups": groups, "seed_spread": seeds, "method_spread": methods,
            "varies_more": more}


def _figure(x: float, quality: Quality) -> str:
    return f"{x:.1f}" if quality.points else fmt.number(x)


def seed_lines(summary: dict, quality: Quality) -> list[str]:
    """'LoRA r=8: F1 90.1 ± 1.2 over 3 seeds' per method, then the sentence on
    which varies more."""
    unit = " pt" if quality.points else ""
    lines = [f"{g['label']}: {quality.label} {_figure(g['mean'], quality)} ± "
             f"{_figure(g['spread'], quality)} over {len(g['values'])} seeds"
             for g in summary["groups"].values()]
    seeds = _figure(summary["seed_spread"], quality)
    if summary["varies_more"] is None:
        return lines
    methods = _figure(summary["method_spread"], quality)
    tail = ("seeds vary more: the ranking of the methods is within seed noise"
            if summary["varies_more"] == "seeds"
            else "methods vary more than seeds")
    lines.append(f"{quality.label} spread between seeds (within a method) ±{seeds}{unit}, "
                 f"between the methods' means ±{methods}{unit}: {tail}.")
    return lines


def to_csv(rows: list[dict]) -> str:
    quality, full = headline_quality(rows), reference_row(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in
                         csv_row(row, full, quality).items()})
    return buf.getvalue()
