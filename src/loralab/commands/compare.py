"""`loralab compare`: full fine-tuning, head-only, LoRA and QLoRA side by side."""

from __future__ import annotations

import sys

import click

from loralab.config import TASKS
from loralab.lab.compare import DEFAULT_OUTPUT as COMPARE_OUTPUT
from loralab.lab.plan import DEFAULT_METHODS, METHODS

CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True,
           "help_option_names": ["-h", "--help"]}


def _keep_dry_run(ctx, _param, value):
    ctx.meta["loralab.dry_run"] = value  # read by run_plan: both commands, one place


def lab_options(func):
    """Options shared by compare and sweep."""
    for option in reversed([
        click.option("--model", default=None, help="Model: alias, local HF dir or hub id "
                     "[default: minilm for classify, smollm2-135m for sft and lm]."),
        click.option("--data", default=None, help="Data file or built-in set "
                     "(tickets, instructions) [default: tickets]."),
        click.option("--task", type=click.Choice(TASKS), default=None,
                     help="Task [default: from the data]."),
        click.option("--overwrite", is_flag=True, help="Replace an output dir that holds a "
                     "different comparison."),
        click.option("--general-text", default=None, help="Plain-text file for forgetting "
                     "(sft, lm) [default: loralab's built-in prose]."),
        click.option("--generations", type=int, default=4, show_default=True,
                     help="Held-out prompts answered side by side (sft)."),
        click.option("--max-new-tokens", type=int, default=64, show_default=True,
                     help="Tokens generated per answer (greedy)."),
        click.option("--tune-lr", is_flag=True, help="First search each run's learning rate "
                     "(its default x --lr-factors, a fraction of the steps, scored on the eval "
                     "split), then train each at its best."),
        click.option("--lr-factors", default=None, help="Multiples of each method's default "
                     "learning rate tried by --tune-lr [default: 0.333,1,3]."),
        click.option("--tune-fraction", type=float, default=None, help="Share of each run's "
                     "steps a --tune-lr search run trains [default: 0.25]."),
        click.option("--dry-run", is_flag=True, expose_value=False, callback=_keep_dry_run,
                     help="Print the plan (runs, steps, estimated peak memory) and exit."),
        click.argument("train_args", nargs=-1, type=click.UNPROCESSED),
    ]):
        func = option(func)
    return func


def run_plan(plan, overwrite: bool) -> list[dict]:
    """The learning-rate search first when the plan asks for one, then the runs;
    with --dry-run, the plan printed instead and the command ends."""
    from loralab.lab.execute import execute

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("loralab.dry_run"):
        from loralab.lab.dry_run import print_plan

        print_plan(plan)
        ctx.exit(0)

    if plan.lab.get("tune_lr"):
        from loralab.lab.lr_search import tune

        tune(plan, overwrite=overwrite)  # opens (and with --overwrite clears) the output
        overwrite = False
    return execute(plan, overwrite=overwrite)


def finish(plan, rows) -> None:
    """Print the table and where the outputs are; exit 1 if a run failed."""
    from rich.console import Console

    from loralab.lab.table import results_table

    console = Console()
    if not console.is_terminal:  # piped or logged: room for the whole table
        console = Console(width=140)
    console.print(results_table(rows, title=f"loralab {plan.kind}"))
    for name in ("report.html", "results.json", "results.csv"):
        console.print(f"{name:13} {plan.output / name}")
    failed = [r["run"] for r in rows if r.get("status") == "failed"]
    if failed:
        console.print(f"[red]{len(failed)} of {len(rows)} runs failed[/] ({', '.join(failed)}); "
                      "run the same command again to redo them.")
        sys.exit(1)


@click.command("compare", context_settings=CONTEXT)
@click.option("--methods", default=None, help="Comma-separated: " + ", ".join(METHODS) + " [default: "
              + "; ".join(f"{','.join(m)} for {t}" for t, m in DEFAULT_METHODS.items()) + "].")
@click.option("--ranks", default=None, help="LoRA/QLoRA ranks, comma-separated [default: 8].")
@click.option("--output", default=COMPARE_OUTPUT, show_default=True,
              help="Output dir: one run dir per run, results.json/.csv, report.html.")
@click.option("--export", "export_format", type=click.Choice(["gguf"]), default=None,
              help="Export the best run (by the report's headline quality) to GGUF, "
              "verified, into OUTPUT/export/ (docs/export.md).")
@click.option("--export-quant", default="q8_0", show_default=True,
              help="GGUF type for --export (as `loralab export --quant`).")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Runs of each method, at seeds --seed .. --seed+N-1: the report gives "
              "mean ± spread and says whether seeds or methods vary more.")
@lab_options
def cmd(methods, ranks, output, export_format, export_quant, seeds, model, data, task,
        overwrite, general_text, generations, max_new_tokens, tune_lr, lr_factors,
        tune_fraction, train_args):
    """Train the same model on the same data, split and seed by several methods,
    each in its own process, and measure them side by side. Any `loralab train`
    option (e.g. --epochs 2, --max-length 64) is passed to every run. With no
    arguments: minilm on the built-in support tickets."""
    from loralab.lab.compare import plan_compare

    plan = plan_compare(model=model, data=data, task=task, methods=methods, ranks=ranks,
                        train_args=train_args, output=output, general_text=general_text,
                        generations=generations, max_new_tokens=max_new_tokens,
                        tune_lr=tune_lr, lr_factors=lr_factors, tune_fraction=tune_fraction,
                        seeds=seeds)
    if export_format:  # refused before any training when it could not be exported
        from loralab.export.lab import check_exportable

        export_quant = check_exportable(plan, export_quant)
    rows = run_plan(plan, overwrite)
    if export_format:
        from loralab.export.lab import export_best, rewrite_report

        rewrite_report(plan, export_best(plan.output, rows, export_quant, echo=click.echo))
    finish(plan, rows)
