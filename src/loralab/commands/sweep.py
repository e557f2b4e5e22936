"""`loralab sweep`: a grid over LoRA rank, alpha, learning rate and targets."""

from __future__ import annotations

import click

from loralab.commands.compare import CONTEXT, finish, lab_options, run_plan
from loralab.lab.sweep import DEFAULT_OUTPUT, DEFAULT_RANKS


@click.command("sweep", context_settings=CONTEXT)
@click.option("--methods", default=None, help="Swept methods: lora, qlora and/or the "
              "variants dora, qdora, pissa, olora, rslora, lora-plus [default: lora].")
@click.option("--ranks", default=None, help="Ranks, comma-separated "
              f"[default: {','.join(map(str, DEFAULT_RANKS))}].")
@click.option("--alphas", default=None, help="Alphas: numbers or multiples of the rank "
              "such as 2r, comma-separated [default: 2r].")
@click.option("--lrs", default=None, help="Learning rates, comma-separated "
              "[default: the method's default].")
@click.option("--targets", default=None, help="Target presets or module lists, separated by "
              "commas: attention, all-linear [default: attention].")
@click.option("--baselines", default=None, help="Reference runs: full, head or none "
              "[default: full,head for classify; full for sft].")
@click.option("--output", default=DEFAULT_OUTPUT, show_default=True,
              help="Output dir: one run dir per grid point, results, report.html.")
@lab_options
def cmd(methods, ranks, alphas, lrs, targets, baselines, output, model, data, task, overwrite,
        general_text, generations, max_new_tokens, tune_lr, lr_factors, tune_fraction,
        train_args):
    """Sweep LoRA settings on one model and data set, with full fine-tuning as
    the reference line; the report plots quality against rank and against
    trainable parameters. Any `loralab train` option is passed to every run."""
    from loralab.lab.sweep import plan_sweep

    plan = plan_sweep(model=model, data=data, task=task, methods=methods, ranks=ranks,
                      alphas=alphas, lrs=lrs, targets=targets, baselines=baselines,
                      train_args=train_args, output=output, general_text=general_text,
                      generations=generations, max_new_tokens=max_new_tokens,
                      tune_lr=tune_lr, lr_factors=lr_factors, tune_fraction=tune_fraction)
    finish(plan, run_plan(plan, overwrite))
