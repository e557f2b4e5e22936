"""``--tune-lr``: a short, seeded learning-rate search per run, before the comparison.

A comparison is only as fair as each method's learning rate: full fine-tuning
and LoRA want rates an order of magnitude apart, and LoRA+, DoRA or rsLoRA shift
the best rate again. Published comparisons tune it per method (Biderman et al.,
2024, "LoRA Learns Less and Forgets Less", §3; the LoRA paper's GLUE runs).
Here every run of the plan is first trained at a few rates around its own
default (x 1/3, 1, 3: half a decade either side) for a fraction of its steps,
same seed and split, and scored on the eval split; the comparison then trains
each run at the rate that scored best. The search runs are ordinary lab runs
(one process each, under ``<output>/lr-search/``), so an interrupted search
resumes and a rerun reuses what finished.
"""

from __future__ import annotations

import math

from loralab.errors import LoralabError
from loralab.lab.plan import Plan, RunSpec, resolve_configs, split_list

DEFAULT_FACTORS = (1 / 3, 1.0, 3.0)
DEFAULT_FRACTION = 0.25  # of each run's steps: enough to rank rates, a quarter of the cost
SEARCH_DIR = "lr-search"


def parse_factors(text: str | None) -> list[float]:
    """'0.333,1,3' -> [0.333, 1.0, 3.0]: multiples of each run's default rate."""
    values = []
    for item in split_list(text):
        try:
            value = float(item)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise LoralabError(f"bad learning-rate factor {item!r}: give numbers > 0, "
                               "multiples of each method's default (e.g. --lr-factors 0.333,1,3).")
        values.append(value)
    if text is not None and len(values) < 2:
        raise LoralabError("--lr-factors needs at least two factors to search between "
                           "(e.g. --lr-factors 0.333,1,3).")
    return sorted(set(values)) if values else list(DEFAULT_FACTORS)


def tune_settings(tune_lr: bool, factors: str | None, fraction: float | None) -> dict:
    """The lab settings of a search (part of the comparison's fingerprint)."""
    if not tune_lr:
        if factors is not None or fraction is not None:
            raise LoralabError("--lr-factors and --tune-fraction set the learning-rate search: "
                               "pass --tune-lr too.")
        return {}
    fraction = DEFAULT_FRACTION if fraction is None else fraction
    if not 0 < fraction <= 1:
        raise LoralabError(f"--tune-fraction must be in (0, 1] (got {fraction}): the share "
                           "of each run's steps a search run trains.")
    return {"tune_lr": {"factors": [round(f, 6) for f in parse_factors(factors)],
                        "fraction": fraction}}


def budget(cfg, fraction: float) -> dict:
    """A fraction of the run's steps: of max_steps when set, else of its epochs."""
    if cfg.max_steps:
        return {"max_steps": max(1, math.ceil(cfg.max_steps * fraction))}
    return {"epochs": cfg.epochs * fraction}


def candidate_name(run: str, factor: float) -> str:
    return f"{run}-x{factor:.3g}"


def search_plan(plan: Plan) -> Plan:
    """The search as a plan of its own: one short run per (run, factor)."""
    settings = plan.lab["tune_lr"]
    shared = plan.shared()
    shared.update(general_text=None, save_checkpoints=False)  # no forgetting in a search
    runs = []
    for spec in plan.runs:
        cfg = plan.configs[spec.name]
        for factor in settings["factors"]:
            overrides = {**spec.overrides, "lr": cfg.lr * factor,
                         **budget(cfg, settings["fraction"])}
            runs.append(RunSpec(candidate_name(spec.name, factor), overrides))
    return Plan("lr-search", plan.output / SEARCH_DIR, runs, resolve_configs(shared, runs),
                command=plan.command, lab=dict(plan.lab))


def _score(row: dict, metric: str):
    value = (row.get("eval") or {}).get(metric) if row.get("status") in ("ok", "skipped") \
        else None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def choose(plan: Plan, search: Plan, rows: list[dict]) -> dict:
    """Per run: every candidate's eval score and the best rate (ties and a
    search where nothing finished keep the default, factor 1)."""
    by_name = {r["run"]: r for r in rows}
    out = {}
    for spec in plan.runs:
        cfg = plan.configs[spec.name]
        sign = 1 if cfg.metric_higher_is_better else -1
        candidates = []
        for factor in plan.lab["tune_lr"]["factors"]:
            name = candidate_name(spec.name, factor)
            row = by_name.get(name, {})
            candidates.append({"run": name, "factor": factor, "lr": search.configs[name].lr,
                               "value": _score(row, cfg.metric), "status": row.get("status"),
                               "steps": row.get("steps"), "seconds": row.get("train_seconds")})
        scored = [c for c in candidates if c["value"] is not None]
        best = max(scored, key=lambda c: (sign * c["value"], -abs(math.log(c["factor"]))),
                   default=None)
        out[spec.name] = {"metric": cfg.metric, "split": "eval",
                          "higher_is_better": cfg.metric_higher_is_better,
                          "default_lr": cfg.lr, "best_lr": best["lr"] if best else cfg.lr,
                          "candidates": candidates}
    return out


def tune(plan: Plan, *, overwrite: bool = False, console=None) -> dict:
    """Run the search, then set every run of ``plan`` to its best rate.

    The comparison's output dir is opened first (so ``--overwrite`` clears it,
    search included, once); call ``execute(plan)`` afterwards without it.
    """
    from loralab.lab.execute import execute
    from loralab.lab.outdir import open_output

    open_output(plan, overwrite)
    search = search_plan(plan)
    rows = execute(search, console=console)
    plan.lr_search = choose(plan, search, rows)
    for name, entry in plan.lr_search.items():
        plan.configs[name].lr = entry["best_lr"]
    return plan.lr_search
