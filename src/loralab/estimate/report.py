"""The estimate as a report: one dict (printed as JSON) or a rich table."""

from __future__ import annotations

from loralab.errors import LoralabError
from loralab.estimate.estimator import Estimator
from loralab.estimate.formula import METHODS, EstimateConfig
from loralab.estimate.spec import load_spec
from loralab.estimate.units import format_bytes, parse_size

ROWS = [  # (key in Estimate.bytes, label)
    ("weights", "weights"), ("master_weights", "master weights (fp32)"),
    ("gradients", "gradients"), ("optimizer", "optimizer state"),
    ("activations", "activations"), ("logits", "logits + loss"),
    ("workspace", "workspace"), ("mapped_checkpoint", "mapped checkpoint (CPU)"),
    ("overhead", "framework overhead"),
    ("tensors", "tensors (w+m+g+opt)"), ("total", "peak"),
]


def build_report(model: str | None, method: str, *, task=None, num_labels=2, precision=None,
                 optimizer="adamw", batch_size=16, seq_len=None, rank=8, targets="attention",
                 lora_dropout=0.0, grad_checkpointing=False, device="cuda", gpu=None,
                 overhead=True, micro_batch_tokens=None, target_parameters=None,
                 use_dora=False) -> dict:
    """Estimates for ``method`` (or every method with ``"all"``) as plain data."""
    if not model:
        raise LoralabError("no model given.", hint="Fix: pass --model llama-2-7b (or a "
                           "preset, model dir, config.json or hub id).")
    capacity = parse_size(gpu) if gpu is not None else None
    spec = load_spec(model, task=task, num_labels=num_labels)
    if seq_len is None:  # `loralab train`'s max_length defaults
        seq_len = 128 if spec.task == "classify" else 512
    methods = list(METHODS) if method == "all" else [method]
    if spec.task in ("sft", "lm") and method == "all":
        methods.remove("head")  # a head alone is a classifier
    precision = precision or ("bf16-mixed" if device == "cuda" else "fp32")
    out = {"model": model, "source": spec.source, "origin": spec.hub_id,
           "model_type": spec.model_type, "task": spec.task, "estimates": []}
    for m in methods:
        cfg = EstimateConfig(method=m, precision=precision, optimizer=optimizer,
                             batch_size=batch_size, seq_len=seq_len, rank=rank,
                             targets=targets, lora_dropout=lora_dropout,
                             grad_checkpointing=grad_checkpointing, device=device,
                             overhead=overhead, micro_batch_tokens=micro_batch_tokens,
                             target_parameters=target_parameters, use_dora=use_dora)
        est = Estimator(spec, cfg)
        row = est.at().to_dict()
        if capacity is not None:
            row["gpu"] = {"capacity_bytes": capacity, "fits": row["bytes"]["total"] <= capacity,
                          "max_batch_size": est.max_batch_size(capacity)}
        out["estimates"].append(row)
    return out


def print_report(report: dict) -> None:
    from rich.table import Table

    ests = report["estimates"]
    first = ests[0]
    title = (f"{report['model']} ({report['model_type']}, {report['task']}) - "
             + _shape(first) + f", {first['precision']}, "
             f"{first['optimizer']}, {first['device']}"
             + (", grad checkpointing" if first["grad_checkpointing"] else ""))
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for e in ests:
        label = e["method"] + (f" r={e['rank']}" if e["rank"] else "")
        table.add_column(label, justify="right")
    _param_rows(table, ests)
    for key, label in ROWS:
        if key == "mapped_checkpoint" and not any(e["bytes"][key] for e in ests):
            continue
        style = "bold" if key == "total" else None
        table.add_row(label, *[format_bytes(e["bytes"][key]) for e in ests], style=style)
        if key == "weights":
            for dtype in sorted({d for e in ests for d in e["weights_by_dtype"]}):
                table.add_row(f"  {dtype}", *[format_bytes(e["weights_by_dtype"].get(dtype, 0))
                                               for e in ests], style="dim")
    if "rss_low" in first["bytes"]:
        table.add_row("peak RSS, measured range", *[
            f"{format_bytes(e['bytes']['rss_low'])}-{format_bytes(e['bytes']['rss_high'])}"
            for e in ests], style="dim")
    if "gpu" in first:
        cap = format_bytes(first["gpu"]["capacity_bytes"])
        table.add_row(f"fits in {cap}", *["yes" if e["gpu"]["fits"] else "no" for e in ests])
        table.add_row("largest batch that fits",
                      *[str(e["gpu"]["max_batch_size"]) for e in ests])
    console = _console()
    console.print(table)
    for line in dict.fromkeys(a for e in ests for a in e["assumptions"]):
        style = "yellow" if line.startswith("approximate") else "dim"
        console.print(f"[{style}]- {line}[/{style}]")


def _shape(e: dict) -> str:
    rows, seq, tokens = e["rows_per_pass"], e["seq_len"], e["micro_batch_tokens"]
    if tokens == e["batch_size"] * seq:
        return f"batch {e['batch_size']} x seq {seq}"
    return f"{tokens} tokens per pass ({rows} rows x seq {seq})"


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # files and pipes: wide enough for the tables
        console = Console(width=140)
    return console


def _param_rows(table, ests) -> None:
    table.add_row("parameters", *[f"{e['params']['total']:,}" for e in ests])
    table.add_row("trainable", *[f"{e['params']['trainable']:,} "
                                 f"({e['params']['trainable_percent']:.2f}%)" for e in ests])


def explain(model: str, as_json: bool = False) -> None:
    """Print how the published 7B numbers arise, computed on ``model``."""
    import json

    from loralab.estimate.explain import NOMINAL_PARAMS, activation_batch_for, explain_rows

    spec = load_spec(model)
    rows = explain_rows(spec)
    target = int(24 * NOMINAL_PARAMS)
    batch = activation_batch_for(spec, target)
    if as_json:
        print(json.dumps({"model": model, "rows": rows,
                          "fp32_batch_reaching_168GB_at_seq_512": batch}, indent=2))
        return
    _print_explain(model, rows, batch)


def _print_explain(model: str, rows: list[dict], batch: int) -> None:
    from rich.table import Table

    table = Table(title=f"Why published tables differ - computed on {model}",
                  title_justify="left")
    for col, justify in (("published", "left"), ("assumption", "left"), ("B/param", "right"),
                         ("x 7e9", "right"), ("exact states", "right"),
                         ("peak (batch 1 x 512)", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        nominal = format_bytes(r["nominal_7b_bytes"]) if r["nominal_7b_bytes"] else "-"
        table.add_row(r["published"], r["assumption"], f"{r['bytes_per_param']:.2f}", nominal,
                      format_bytes(r["states_bytes"]), format_bytes(r["peak_bytes"]))
    console = _console()
    console.print(table)
    console.print(
        "States = weights + master + gradients + optimizer. Tables multiply bytes/param by a "
        "nominal 7e9; the model's exact count and the activations (not in the 84/112/168 "
        "figures) move the real number. Read the other way, 168 GB is also fp32 AdamW "
        f"(16 B/param) plus activations: batch {batch} x 512 of fp32 full fine-tuning "
        "reaches it. See docs/memory.md.")
