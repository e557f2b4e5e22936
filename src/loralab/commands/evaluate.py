"""`loralab eval`: metrics of a saved model or adapter on any data file."""

from __future__ import annotations

import json

import click

from loralab.commands.options import POSITIVE_INT


@click.command("eval")
@click.option("--model", required=True, help="Base model (alias, dir, hub id) or a saved model/.")
@click.option("--adapter", default=None, help="Adapter dir from `loralab train` or peft.")
@click.option("--data", required=True, help="Table (classify), instruction JSON/JSONL, or .txt.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--max-length", type=POSITIVE_INT, default=None, help="Default: the training max length.")
@click.option("--batch-size", type=POSITIVE_INT, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def cmd(model, adapter, data, text_column, label_column, max_length, batch_size, as_json):
    """Evaluate MODEL (+ ADAPTER) on DATA with the training metrics."""
    from loralab.train.evaluate import evaluate_saved

    result = evaluate_saved(model, data, adapter, text_column=text_column,
                            label_column=label_column, max_length=max_length,
                            batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print(result)


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = result["metrics"]
    table = Table(title=f"{result['task']} · {result['data']} ({result['examples']} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "precision", "recall", "f1", "loss", "perplexity"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    console = Console()
    console.print(table)
    if "per_class" in metrics:
        per = Table(title="per class")
        for col in ("label", "precision", "recall", "f1", "support"):
            per.add_column(col)
        for label, row in metrics["per_class"].items():
            per.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                        f"{row['f1']:.3f}", str(row["support"]))
        console.print(per)
