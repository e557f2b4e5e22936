"""`loralab train`: fine-tune a model by full fine-tuning, LoRA, QLoRA or head-only."""

from __future__ import annotations

import os

import click

from loralab.config import (
    DEFAULT_LR,
    DEFAULT_LR_CLASSIFY,
    METHODS,
    PRECISIONS,
    SCHEDULERS,
    TASKS,
)

OPTIONS = [
    ("--model", str, "Model: alias (minilm, smollm2-135m), local HF dir or hub id."),
    ("--data", str, ("Training data: a CSV/TSV/JSON/JSONL/Parquet/.txt file, a "
                     "save_to_disk dir, a hub dataset id, or a built-in set: tickets, "
                     "instructions.")),
    ("--task", click.Choice(TASKS), "Task (default: from the data)."),
    ("--method", click.Choice(METHODS), "Fine-tuning method."),
    ("--output", str, "Run directory (default: runs/<model>-<task>-<method>-<time>)."),
    ("--eval-data", str, "Eval file (default: 10% of --data)."),
    ("--test-data", str, "Test file (default: 10% of --data)."),
    ("--text-column", str, "Text column name or 0-based index (classify, lm)."),
    ("--label-column", str, "Label column name or 0-based index (classify)."),
    ("--prompt-field", str, "sft: the field holding the prompt (default: detected)."),
    ("--response-field", str, "sft: the field holding the response (default: detected)."),
    ("--messages-field", str, "sft: the field holding chat messages (default: detected)."),
    ("--truncation", click.Choice(["left", "drop"]),
     "sft records over --max-length: cut the prompt from the left (default) or drop them."),
    ("--data-split", str, "Split of a save_to_disk DatasetDict or hub dataset [train]."),
    ("--data-config", str, "Configuration of a hub dataset."),
    ("--rank", int, "LoRA rank r."),
    ("--alpha", float, "LoRA alpha (default 2 x rank)."),
    ("--targets", str, "LoRA targets: attention, all-linear, a,b,c or re:REGEX."),
    ("--target-parameters", str, ("LoRA on MoE experts' 3-D weights: experts, or "
                                  "experts.gate_up_proj,experts.down_proj (peft's "
                                  "target_parameters).")),
    ("--dropout", float, "LoRA dropout."),
    ("--init-lora-weights", str, ("LoRA init, peft's names: default, gaussian, pissa, "
                                  "pissa_niter_K (fast SVD), olora.")),
    ("--lora-plus-ratio", float, "LoRA+: B's learning rate = ratio x --lr (paper: 16)."),
    ("--epochs", float, "Epochs."),
    ("--max-steps", int, "Optimizer steps (overrides --epochs)."),
    ("--batch-size", int, "Examples per micro-batch (per process)."),
    ("--grad-accum", int, "Micro-batches per optimizer step."),
    ("--micro-batch-tokens", int, ("Padded tokens per forward/backward: a step's rows fill "
                                   "micro-batches up to it [default: batch x max length; 0: "
                                   "batch-size rows each].")),
    ("--global-batch-size", int, "Examples per step, all processes (batch x accum x procs)."),
    ("--lr", float, (f"Peak learning rate [default: full {DEFAULT_LR['full']:.0e}; LoRA/QLoRA "
                     f"{DEFAULT_LR_CLASSIFY['lora']:.0e} for classify, "
                     f"{DEFAULT_LR['lora']:.0e} otherwise; head {DEFAULT_LR['head']:.0e}]."
                     .replace("e-0", "e-"))),
    ("--weight-decay", float, "AdamW weight decay."),
    ("--warmup-ratio", float, "Fraction of steps of linear warmup."),
    ("--scheduler", click.Choice(SCHEDULERS), "Decay after warmup."),
    ("--max-length", int, "Max tokens per example (longer rows are truncated)."),
    ("--eval-every", int, "Evaluate every N steps (default: each epoch)."),
    ("--metric", str, "Metric that picks the best checkpoint (f1, accuracy, loss...)."),
    ("--seed", int, "Random seed."),
    ("--general-text", str, "Plain-text file for forgetting (sft, lm): perplexity before/after."),
    ("--mixed-precision", click.Choice(PRECISIONS), "Autocast dtype."),
]


def _add_options(func):
    for flag, typ, help_text in reversed(OPTIONS):
        func = click.option(flag, type=typ, default=None, help=help_text)(func)
    return func


@click.command("train", context_settings={"show_default": False})
@click.argument("args", nargs=-1)
@_add_options
@click.option("--use-dora", is_flag=True, default=None,
              help="DoRA: a learned magnitude per output feature (QDoRA with --method qlora).")
@click.option("--use-rslora", is_flag=True, default=None,
              help="rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank.")
@click.option("--gradient-checkpointing", is_flag=True, default=None,
              help="Recompute activations in backward to save memory.")
@click.option("--fsdp", is_flag=True, default=None,
              help="Shard weights, gradients and optimizer state over the GPUs (FSDP).")
@click.option("--resume", "resume", type=click.Path(file_okay=False), default=None,
              help="Continue the interrupted run in DIR from its last checkpoint.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing run dir.")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json when done.")
def cmd(args, resume, as_json, **options):
    """Fine-tune MODEL on DATA. ARGS: an optional config.yaml, then key=value
    overrides (e.g. `loralab train cfg.yaml rank=16 lr=1e-4`). With no
    arguments: minilm + LoRA on the built-in support tickets."""
    from loralab.config import build_config
    from loralab.train import run_training
    from loralab.train.distributed import failure_barrier
    from loralab.train.summary import print_summary

    yaml_path, overrides = _split_args(args)
    given = {k: v for k, v in options.items() if v is not None}
    with failure_barrier():  # under torchrun: one error line (rank 0's) for all ranks
        cfg = build_config(yaml_path, overrides, given)
        run_dir = run_training(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun/accelerate launch
        print_summary(run_dir, as_json=as_json)


def _split_args(args: tuple[str, ...]):
    from loralab.errors import LoralabError

    if args and "=" not in args[0]:
        if not args[0].endswith((".yaml", ".yml")):
            raise LoralabError(f"unexpected argument {args[0]!r}: give a .yaml config file "
                               "first, then key=value overrides.")
        return args[0], list(args[1:])
    return None, list(args)
