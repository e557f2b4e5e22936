"""`loralab targets`: a model's linear layers and LoRA sizes per preset."""

from __future__ import annotations

import click


@click.command("targets")
@click.option("--model", "model_name", default="minilm", show_default=True,
              help="Alias, local model dir, or hub id.")
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank for the counts.")
@click.option("--task", type=click.Choice(["classify", "sft", "lm", "base"]), default=None,
              help="Model head to build (default: from the config).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def cmd(model_name, rank, task, as_json):
    """List the model's linear layers with shapes, and LoRA parameter counts per preset."""
    import json
    import sys

    from rich.console import Console
    from rich.table import Table

    from loralab.errors import require
    from loralab.inspect_model import linear_groups, preset_counts
    from loralab.lora.param import expert_groups
    from loralab.models import build_meta_model, default_task, load_config

    require(rank > 0, f"rank must be a positive integer, got {rank}.", "Fix: pass --rank 8.")
    config = load_config(model_name)
    task = task or default_task(config)
    model = build_meta_model(config, task, num_labels=2)
    groups, presets = linear_groups(model), preset_counts(model, rank)
    experts = expert_groups(model, rank)  # MoE: fused 3-D expert weights, not linear layers
    total = sum(p.numel() for p in model.parameters())
    if as_json:
        click.echo(json.dumps({"model": model_name, "task": task, "total_params": total,
                               "rank": rank, "linear": groups, "presets": presets,
                               "target_parameters": experts}, indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"{model_name}: linear layers ({type(model).__name__}, "
                  f"{total:,} params)")
    for col in ("module", "type", "d_in", "d_out", "layers", f"LoRA r={rank} / layer",
                "in presets"):
        table.add_column(col, justify="left" if col in ("module", "type", "in presets")
                         else "right", no_wrap=col == "module")
    for g in groups:
        table.add_row(g["name"], g["type"], str(g["d_in"]), str(g["d_out"]), str(g["count"]),
                      f"{rank * (g['d_in'] + g['d_out']):,}", ", ".join(g["presets"]) or "-")
    console.print(table)
    ptable = Table(title=f"LoRA parameters at rank {rank}")
    for col in ("preset", "layers", "LoRA params", "% of model"):
        ptable.add_column(col, justify="left" if col == "preset" else "right")
    for row in presets:
        if row["params"] is None:
            ptable.add_row(row["preset"], "-", "no preset for this architecture", "-")
        else:
            ptable.add_row(row["preset"], str(row["layers"]), f"{row['params']:,}",
                           f"{row['percent']:.3f}%")
    console.print(ptable)
    for g in experts:
        console.print(f"3-D parameter {g['name']} {tuple(g['shape'])} x {g['layers']} layers: "
                      f"{g['lora_per_layer']:,} LoRA params per layer at r={rank} "
                      "(--target-parameters experts; not in the presets)")
