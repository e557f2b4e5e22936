"""``loralab compare``: the same model, data, split and seed trained by several
methods, each run in its own process, measured side by side."""

from __future__ import annotations

from pathlib import Path

from loralab.errors import LoralabError
from loralab.lab.plan import (
    DEFAULT_METHODS,
    LORA_FAMILY,
    VARIANT_KEYS,
    VARIANTS,
    Plan,
    RunSpec,
    check_general_text,
    check_passthrough,
    command_line,
    default_general_text,
    parse_methods,
    parse_ranks,
    parse_train_args,
    resolve_configs,
)

DEFAULT_OUTPUT = "runs/compare"
# The two real models loralab ships aliases for: an encoder for classification,
# a small causal LM for instruction tuning.
DEFAULT_MODEL = {"classify": "minilm", "sft": "smollm2-135m", "lm": "smollm2-135m"}
DEFAULT_GENERATIONS = 4  # held-out prompts shown side by side (sft)
DEFAULT_MAX_NEW_TOKENS = 64


def compare_runs(methods: list[str], ranks: list[int]) -> list[RunSpec]:
    """full, head once each; lora, qlora and the LoRA variants once per rank."""
    runs = []
    for method in methods:
        variant = VARIANTS[method]
        if method in LORA_FAMILY:
            runs += [RunSpec(f"{method}-r{r}", {**variant, "rank": r}) for r in ranks]
        else:
            runs.append(RunSpec(method, dict(variant)))
    return runs


def seeded_runs(runs: list[RunSpec], seed: int, seeds: int) -> list[RunSpec]:
    """``--seeds N``: every run at seeds seed .. seed+N-1, named ``NAME-sSEED``, so
    the report can set the spread between seeds beside the gaps between methods."""
    if seeds == 1:
        return runs
    return [RunSpec(f"{run.name}-s{seed + i}", {**run.overrides, "seed": seed + i})
            for run in runs for i in range(seeds)]


def _seed_count(seeds: int) -> int:
    if not isinstance(seeds, int) or not 1 <= seeds <= 20:
        raise LoralabError(f"--seeds {seeds}: give a whole number from 1 to 20 "
                           "(e.g. --seeds 3: each method at three seeds).")
    return seeds


def shared_options(model, data, task, train_args) -> dict:
    from loralab.config import infer_task

    options = parse_train_args(train_args)
    options["data"] = data or "tickets"
    options["task"] = task or infer_task(options["data"], options)
    options["model"] = model or DEFAULT_MODEL[options["task"]]
    return options


def sft_settings(task: str, general_text: str | None) -> str | None:
    if task not in ("sft", "lm"):
        if general_text:
            raise LoralabError("--general-text measures forgetting of causal language models "
                               "and needs an sft comparison (or lm). Drop it, or pass --task "
                               "sft with instruction data (--task lm with text).")
        return None
    return check_general_text(general_text) if general_text else default_general_text()


def plan_compare(*, model=None, data=None, task=None, methods=None, ranks=None,
                 train_args=(), output=DEFAULT_OUTPUT, general_text=None,
                 generations=DEFAULT_GENERATIONS, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                 tune_lr=False, lr_factors=None, tune_fraction=None, seeds=1) -> Plan:
    """Validate everything and resolve one config per run; nothing runs yet.
    ``tune_lr``: search each run's learning rate first (``lab.lr_search``);
    ``seeds``: each run that many times, at consecutive seeds."""
    from loralab.config import TrainConfig
    from loralab.lab.lr_search import tune_settings

    lab = tune_settings(tune_lr, lr_factors, tune_fraction)
    shared = shared_options(model, data, task, train_args)
    check_passthrough(shared, ("method", "rank") + VARIANT_KEYS, "compare")
    chosen = parse_methods(methods, DEFAULT_METHODS.get(shared["task"], ()))
    rank_list = parse_ranks(ranks)
    gt = sft_settings(shared["task"], general_text)
    if gt:
        shared["general_text"] = gt
    if generations < 0 or max_new_tokens < 1:
        raise LoralabError("--generations must be >= 0 and --max-new-tokens >= 1.")
    seed = int(shared.get("seed", TrainConfig.__dataclass_fields__["seed"].default))
    runs = seeded_runs(compare_runs(chosen, rank_list), seed, _seed_count(seeds))
    configs = resolve_configs(shared, runs)
    command = command_line("compare", [
        ("--model", shared["model"]), ("--data", shared["data"]), ("--task", shared["task"]),
        ("--methods", ",".join(chosen)), ("--ranks", ",".join(map(str, rank_list))),
        ("--output", output), ("--general-text", general_text),
        ("--generations", generations if shared["task"] == "sft" else None),
        ("--max-new-tokens", max_new_tokens if shared["task"] == "sft" else None),
        *tune_flags(tune_lr, lr_factors, tune_fraction),
        ("--seeds", seeds if seeds > 1 else None)], train_args)
    return Plan("compare", Path(output), runs, configs, general_text=gt,
                generations=generations if shared["task"] == "sft" else 0,
                max_new_tokens=max_new_tokens, command=command, lab=lab)


def tune_flags(tune_lr, lr_factors, tune_fraction) -> list[tuple[str, object]]:
    """The learning-rate search's options, for the command line that reproduces a plan."""
    return [("--tune-lr", bool(tune_lr)), ("--lr-factors", lr_factors),
            ("--tune-fraction", tune_fraction)]
