"""``loralab sweep``: a grid over LoRA rank, alpha, learning rate and target
preset, with full fine-tuning (and head-only, for classification) as references.

Sweeps are data: one run dir per grid point, named after its settings, so a
larger grid reuses every run a smaller one already finished.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from loralab.errors import LoralabError
from loralab.lab.compare import (
    DEFAULT_GENERATIONS,
    DEFAULT_MAX_NEW_TOKENS,
    sft_settings,
    shared_options,
    tune_flags,
)
from loralab.lab.plan import (
    LORA_FAMILY,
    VARIANT_KEYS,
    VARIANTS,
    Plan,
    RunSpec,
    check_passthrough,
    command_line,
    parse_methods,
    parse_ranks,
    resolve_configs,
    split_list,
)

DEFAULT_OUTPUT = "runs/sweep"
# Powers of two up to 64 cover the range the LoRA paper studies (§7.2, Table 6).
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)


def parse_alphas(text: str | None) -> list[str | float]:
    """'2r' (alpha follows the rank: alpha = 2r) or fixed values: '2r,16'."""
    out: list[str | float] = []
    for item in split_list(text) or ["2r"]:
        if re.fullmatch(r"\d*(\.\d+)?r", item):
            factor = float(item[:-1] or 1)
            if factor <= 0:
                raise LoralabError(f"bad alpha {item!r}: the factor must be > 0 (e.g. 2r).")
            out.append(item)
            continue
        try:
            value = float(item)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise LoralabError(f"bad alpha {item!r}: give numbers > 0 or a multiple of the "
                               "rank such as 2r (e.g. --alphas 2r,16).")
        out.append(value)
    return list(dict.fromkeys(out))


def parse_lrs(text: str | None) -> list[float | None]:
    values: list[float | None] = []
    for item in split_list(text):
        try:
            value = float(item)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise LoralabError(f"bad learning rate {item!r}: give numbers > 0 "
                               "(e.g. --lrs 1e-4,2e-4).")
        values.append(value)
    return values or [None]  # None: the method's default learning rate


def alpha_value(alpha: str | float, rank: int) -> float:
    return float(alpha[:-1] or 1) * rank if isinstance(alpha, str) else float(alpha)


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")[:40] or "x"


def grid_runs(methods, ranks, alphas, lrs, targets) -> list[RunSpec]:
    """One run per grid point; names spell every setting, so they are stable.
    Points that coincide (alpha 2r and a fixed alpha at one rank) run once."""
    runs: dict[str, RunSpec] = {}
    for method, target, alpha, lr, rank in itertools.product(methods, targets, alphas, lrs,
                                                             ranks):
        a = alpha_value(alpha, rank)
        overrides = {**VARIANTS[method], "rank": rank, "alpha": a, "targets": target}
        name = f"{method}-r{rank}-a{a:g}-{safe(target)}"
        if lr is not None:
            overrides["lr"] = lr
            name += f"-lr{lr:g}"
        runs.setdefault(name, RunSpec(name, overrides))
    return list(runs.values())


def parse_baselines(text: str | None, task: str) -> list[str]:
    if text is not None and text.strip().lower() == "none":
        return []
    default = ("full", "head") if task == "classify" else ("full",)
    chosen = parse_methods(text, default)
    bad = [m for m in chosen if m in LORA_FAMILY]
    if bad:
        raise LoralabError(f"baseline {bad[0]!r} is swept, not a baseline. "
                           "Use --baselines full,head or none.")
    return chosen


def plan_sweep(*, model=None, data=None, task=None, methods=None, ranks=None, alphas=None,
               lrs=None, targets=None, baselines=None, train_args=(), output=DEFAULT_OUTPUT,
               general_text=None, generations=DEFAULT_GENERATIONS,
               max_new_tokens=DEFAULT_MAX_NEW_TOKENS, tune_lr=False, lr_factors=None,
               tune_fraction=None) -> Plan:
    """Validate the grid and resolve one config per run; nothing runs yet."""
    from loralab.lab.lr_search import tune_settings

    lab = tune_settings(tune_lr, lr_factors, tune_fraction)
    if tune_lr and lrs:
        raise LoralabError("--tune-lr searches each run's learning rate; --lrs fixes them. "
                           "Pass one of the two.")
    shared = shared_options(model, data, task, train_args)
    check_passthrough(shared, ("method", "rank", "alpha", "lr", "targets") + VARIANT_KEYS,
                      "sweep")
    swept = parse_methods(methods, ("lora",))
    if any(m not in LORA_FAMILY for m in swept):
        others = ", ".join(m for m in LORA_FAMILY if m not in ("lora", "qlora"))
        raise LoralabError(f"sweep varies LoRA settings: --methods takes lora and/or qlora, or "
                           f"the variants {others}. Full fine-tuning and head-only are "
                           "--baselines.")
    rank_list = parse_ranks(ranks, DEFAULT_RANKS)
    alpha_list, lr_list = parse_alphas(alphas), parse_lrs(lrs)
    target_list = split_list(targets) or ["attention"]
    base = parse_baselines(baselines, shared["task"])
    gt = sft_settings(shared["task"], general_text)
    if gt:
        shared["general_text"] = gt
    runs = [RunSpec(m, {"method": m}) for m in base]
    runs += grid_runs(swept, rank_list, alpha_list, lr_list, target_list)
    configs = resolve_configs(shared, runs)
    sft = shared["task"] == "sft"
    command = command_line("sweep", [
        ("--model", shared["model"]), ("--data", shared["data"]), ("--task", shared["task"]),
        ("--methods", ",".join(swept)), ("--ranks", ",".join(map(str, rank_list))),
        ("--alphas", ",".join(map(str, alpha_list))), ("--lrs", lrs),
        ("--targets", ",".join(target_list)), ("--baselines", ",".join(base) or "none"),
        ("--output", output), ("--general-text", general_text),
        ("--generations", generations if sft else None),
        ("--max-new-tokens", max_new_tokens if sft else None),
        *tune_flags(tune_lr, lr_factors, tune_fraction)], train_args)
    return Plan("sweep", Path(output), runs, configs, general_text=gt,
                generations=generations if sft else 0, max_new_tokens=max_new_tokens,
                command=command, lab=lab)
