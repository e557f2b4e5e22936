"""The console table printed at the end of a comparison (rich)."""

from __future__ import annotations

from rich.table import Table

from loralab.lab import fmt
from loralab.lab import results as R


def _short(n) -> str:
    """Bytes in 3-4 characters: 3.8M, 578K, 1.1G."""
    text = fmt.nbytes(n)
    return text.replace(" GiB", "G").replace(" MiB", "M").replace(" KiB", "K").replace(" B", "B")


def _memory(row: dict) -> str:
    mem = R.memory_breakdown(row)
    if mem is None:
        return "—"
    measured = "".join(f" {tag}{_short(mem[k])}" for k, tag in
                       (("process_baseline", "base"), ("mapped_checkpoint", "map"))
                       if mem.get(k))  # CPU: measured parts of the rest
    return (f"{fmt.nbytes(mem['peak'])}\n[dim]w{_short(mem['weights'])} "
            f"g{_short(mem['gradients'])} o{_short(mem['optimizer'])}{measured}[/]")


def _forgetting(row: dict) -> str:
    f = row.get("forgetting") or {}
    if not fmt.is_number(f.get("after_ppl")):
        return "—"
    return (f"{fmt.number(f.get('before_ppl'))}→{fmt.number(f['after_ppl'])}\n"
            f"{fmt.signed(f.get('percent'), 1)}%")


def _quality(row: dict, quality: R.Quality) -> str:
    """The figure, its 95 % interval, the other figure, and the at-chance flag."""
    lines = [R.quality_text(row, quality), f"[dim]{R.interval_text(row, quality)}[/]",
             f"[dim]{R.secondary_text(row, quality)}[/]"]
    if R.at_chance(row):
        lines.append(f"[bold red]{R.AT_CHANCE}[/]")
    return "\n".join(line for line in lines if line not in ("[dim][/]", ""))


def _baseline_row(rows: list[dict], quality: R.Quality, columns: list[str]) -> list[str] | None:
    base = R.baseline(rows, quality)
    if base is None:
        return None
    cells = [f"[italic]{base['name']}[/]\n[dim]{base['detail']}[/]"] + [""] * (len(columns) - 1)
    other = R.ACCURACY if quality.key == "f1" else R.F1
    second = R.baseline_text(base, other)
    cells[columns.index(quality.label)] = R.baseline_text(base, quality) + (
        f"\n[dim]{other.label} {second}[/]" if second != "—" else "")
    if "forgetting" in columns and fmt.is_number(base.get("before_ppl")):
        cells[columns.index("forgetting")] = fmt.number(base["before_ppl"])
    return cells


def results_table(rows: list[dict], title: str | None = None) -> Table:
    """method and rank, trainable params (count, %), time, tokens/s, peak memory
    with breakdown (w/g/o: weights, gradients, optimizer), artifact size, quality
    with its 95 % interval, forgetting (sft) and ratios against full fine-tuning
    (the quality difference in the paired bootstrap's words); the baseline as a
    reference row and the data's caveats beneath."""
    quality, full = R.headline_quality(rows), R.reference_row(rows)
    forgetting = any(r.get("forgetting") for r in rows)
    seeds = R.seed_summary(rows, quality)
    notes = [f"note: {c}" for c in R.caveats(rows)] + \
        [f"seeds: {line}" for line in (R.seed_lines(seeds, quality) if seeds else [])]
    table = Table(title=title, show_lines=True, caption_justify="left",
                  caption="\n".join(notes) or None)
    columns = ["method", "trainable", "time", "tok/s", "peak memory", "artifact",
               quality.label] + (["forgetting"] if forgetting else []) + ["vs full FT"]
    for i, name in enumerate(columns):
        shown = R.quality_header(rows, quality) if name == quality.label else name
        table.add_column(shown, justify="left" if i == 0 else "right")
    baseline = _baseline_row(rows, quality, columns)
    if baseline is not None:
        table.add_row(*baseline)
    for row, label in zip(rows, R.labels(rows)):
        head = f"{label}\n[dim]{row.get('run')}[/]"
        if row.get("status") not in R.HAS_RESULTS:
            table.add_row(head, f"[red]failed[/]: {row.get('error')}",
                          *[""] * (len(columns) - 2))
            continue
        ref = R.reference_for(row, rows) or full
        vs = R.versus_full(row, ref, quality)
        ratios = (f"{fmt.ratio(vs.get('speedup'))} faster\n{fmt.ratio(vs.get('memory_ratio'))}"
                  f" mem\n{R.delta_text(vs, quality)}") if vs and row is not ref else "—"
        cells = [(f"{fmt.count(row.get('trainable_params'))}\n"
                 f"{fmt.percent(row.get('trainable_percent'))}"),
                 fmt.seconds(row.get("train_seconds")), fmt.count(row.get("tokens_per_second")),
                 _memory(row), fmt.nbytes(row.get("artifact_bytes")),
                 _quality(row, quality)]
        table.add_row(head, *cells, *([_forgetting(row)] if forgetting else []), ratios)
    return table
