"""Charts for the report, drawn with matplotlib and returned as inline SVG text.

No pyplot: figures are built directly (``matplotlib.figure.Figure``) so drawing
needs no display and no global state. Text stays text in the SVG
(``svg.fonttype: none``), which keeps the report small and searchable.
"""

from __future__ import annotations

import io
import math

import matplotlib as mpl
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from loralab.lab import fmt
from loralab.lab import results as R

METHOD_COLORS = {"full": "#3b4cc0", "head": "#9a9a9a", "lora": "#e07b39", "qlora": "#2a9d8f",
                 "dora": "#b5651d", "qdora": "#1b6f66", "pissa": "#9467bd", "olora": "#c5b0d5",
                 "rslora": "#d62728", "lora-plus": "#8c564b"}
INTERVAL_COLOR = "#222222"  # error bars: the 95 % interval of a quality figure
MEMORY_COLORS = {"weights": "#4e79a7", "gradients": "#f28e2b", "optimizer": "#e15759",
                 "process_baseline": "#76b7b2", "mapped_checkpoint": "#edc948",
                 "other": "#bab0ac"}
STYLE = {"svg.fonttype": "none", "font.size": 10, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}


def to_svg(fig: Figure, name: str) -> str:
    """Render a figure to an <svg> element (no XML prolog). ``name`` salts the
    element ids so several charts can share one page without id clashes."""
    buf = io.StringIO()
    with mpl.rc_context({**STYLE, "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def color(row: dict) -> str:
    spec = R.spec_of(row)
    return METHOD_COLORS.get(spec.get("variant"), METHOD_COLORS.get(spec.get("method"),
                                                                     "#666666"))


def _hbar_figure(n: int, title: str) -> tuple[Figure, object]:
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(5.6, 1.1 + 0.3 * max(n, 2)), layout="constrained")
        ax = fig.add_subplot()
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.grid(axis="y", visible=False)
    ax.invert_yaxis()
    return fig, ax


def hbar(names: list[str], values: list[float], colors: list[str], title: str,
         xlabel: str, notes: list[str], log: bool = False,
         intervals: list | None = None) -> str:
    """Horizontal bars, one per run, each with a text note at its end; ``intervals``
    (a (low, high) pair or None per bar) draws each figure's 95 % interval as an
    error bar, so a difference the test size cannot tell apart is seen to overlap."""
    fig, ax = _hbar_figure(len(names), title)
    ax.barh(names, values, color=colors)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ends = list(values)
    for y, (value, iv) in enumerate(zip(values, intervals or [])):
        if iv is None:
            continue
        lo, hi = iv
        ax.errorbar([value], [y], xerr=[[max(value - lo, 0)], [max(hi - value, 0)]],
                    fmt="none", ecolor=INTERVAL_COLOR, elinewidth=1.2, capsize=3)
        ends[y] = max(value, hi)
    top = max(ends) if ends else 1
    for y, (end, note) in enumerate(zip(ends, notes)):
        ax.text(end * (1.08 if log else 1) + (0 if log else top * 0.01), y, note,
                va="center", fontsize=9)
    ax.set_xlim(right=top * (8 if log else 1.32))
    return to_svg(fig, title)


def memory_stack(names: list[str], parts: list[dict], title: str) -> str:
    """Stacked bars of the peak-memory breakdown, in MiB."""
    fig, ax = _hbar_figure(len(names), title)
    left = [0.0] * len(names)
    for key in R.MEMORY_PARTS:
        if not any(p.get(key) for p in parts) and key not in ("weights", "other"):
            continue  # parts no run measured (GPU runs have no process baseline)
        widths = [(p.get(key) or 0) / 2**20 for p in parts]
        ax.barh(names, widths, left=left, color=MEMORY_COLORS[key], label=R.MEMORY_LABELS[key])
        left = [a + b for a, b in zip(left, widths)]
    for y, p in enumerate(parts):
        ax.text(left[y] * 1.01, y, fmt.nbytes(p["peak"]), va="center", fontsize=9)
    ax.set_xlim(right=max(left) * 1.25 if left else 1)
    ax.set_xlabel("MiB at peak")
    fig.legend(loc="outside lower center", fontsize=8, ncol=3, frameon=False)
    return to_svg(fig, title)


def loss_curves(rows: list[dict], names: list[str]) -> str:
    """Training loss of every run against the optimizer step, on one chart."""
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(5.6, 3.4), layout="constrained")
        ax = fig.add_subplot()
    many = len(rows) > len(METHOD_COLORS)  # a sweep: one colour per run, not per method
    for i, (row, name) in enumerate(zip(rows, names)):
        curve = [p for p in row.get("loss_curve") or [] if len(p) == 2 and fmt.is_number(p[1])]
        if curve:
            col = mpl.colormaps["tab20"](i % 20) if many else color(row)
            ax.plot([p[0] for p in curve], [p[1] for p in curve], label=name, color=col,
                    linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss", loc="left", fontsize=11, fontweight="bold")
    ax.legend(fontsize=7 if len(rows) > 6 else 8, frameon=False, ncol=2 if len(rows) > 6 else 1)
    return to_svg(fig, "loss")


def _plot_value(row: dict, quality: R.Quality):
    value = R.metric_value(row, quality.key)
    return value * 100 if value is not None and quality.points else value


def _alpha_mode(spec: dict) -> str:
    rank, alpha = spec.get("rank"), spec.get("alpha")
    if fmt.is_number(rank) and fmt.is_number(alpha) and alpha == 2 * rank:
        return "α=2r"
    return f"α={fmt.number(alpha)}" if fmt.is_number(alpha) else "α=?"


def sweep_groups(rows: list[dict], quality: R.Quality) -> dict[str, list[dict]]:
    """LoRA-family runs grouped into curves: everything but the rank fixed."""
    done = [r for r in R.ok_rows(rows) if R.spec_of(r).get("method") in ("lora", "qlora")
            and fmt.is_number(R.spec_of(r).get("rank")) and _plot_value(r, quality) is not None]
    keys = [(R.spec_of(r).get("variant") or R.spec_of(r)["method"], str(R.spec_of(r).get("targets")),
             _alpha_mode(R.spec_of(r)), str(R.spec_of(r).get("lr"))) for r in done]
    varying = [len({k[i] for k in keys}) > 1 for i in range(4)]
    groups: dict[str, list[dict]] = {}
    for key, row in zip(keys, done):
        name = [fmt.method_name(key[0])]
        name += [f"lr={key[3]}" if i == 3 else key[i] for i in (1, 2, 3) if varying[i]]
        groups.setdefault(" ".join(name), []).append(row)
    return {k: sorted(v, key=lambda r: R.spec_of(r)["rank"]) for k, v in groups.items()}


def _references(ax, rows: list[dict], quality: R.Quality, shown: list[float]) -> None:
    """Full FT (dashed) and head-only (dotted) as horizontal lines; a line far
    outside the swept values is named in the legend only, so the curves keep
    their resolution."""
    full = R.reference_row(rows)
    head = next((r for r in R.ok_rows(rows) if R.spec_of(r).get("method") == "head"), None)
    low, high = min(shown), max(shown)
    span = max(high - low, abs(high) * 0.01, 1e-9)
    for row, style, name in ((full, "--", "full FT"), (head, ":", "head only")):
        value = _plot_value(row, quality) if row else None
        if value is None:
            continue
        label = f"{name} ({fmt.number(value)})"
        if low - 2 * span <= value <= high + 2 * span:
            ax.axhline(value, color=color(row), linestyle=style, linewidth=1.3, label=label)
        else:
            where = "below" if value < low else "above"
            ax.plot([], [], color=color(row), linestyle=style, label=f"{label}, {where} the chart")


def sweep_curve(rows: list[dict], quality: R.Quality, x_key: str) -> str | None:
    """Quality against rank (x_key='rank') or trainable parameters, one line per
    group, full fine-tuning (and head-only) as reference lines."""
    groups = sweep_groups(rows, quality)
    if not groups or max(len(g) for g in groups.values()) < 2:
        return None
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(5.6, 3.4), layout="constrained")
        ax = fig.add_subplot()
    shown = []
    for i, (name, group) in enumerate(groups.items()):
        xs = [R.spec_of(r)["rank"] if x_key == "rank" else r.get("trainable_params")
              for r in group]
        ys = [_plot_value(r, quality) for r in group]
        shown += ys
        ax.plot(xs, ys, marker="o", label=name, color=mpl.colormaps["tab10"](i % 10))
    _references(ax, rows, quality, shown)
    ax.set_xscale("log", base=2 if x_key == "rank" else 10)
    ax.xaxis.set_minor_formatter(NullFormatter())
    if x_key != "rank":  # 20k, 50k, 100k rather than one lone 10^5
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt.count(v)))
    if x_key == "rank":
        ranks = sorted({R.spec_of(r)["rank"] for g in groups.values() for r in g})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
    unit = " (points)" if quality.points else ""
    ax.set_ylabel(f"{quality.label}{unit}")
    ax.set_xlabel("LoRA rank r" if x_key == "rank" else "trainable parameters")
    title = f"{quality.label} vs {'rank' if x_key == 'rank' else 'trainable parameters'}"
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.legend(fontsize=8, frameon=False)
    return to_svg(fig, f"sweep-{x_key}")


def forgetting_bars(rows: list[dict], names: list[str]) -> str | None:
    """Perplexity on general text before and after fine-tuning, per run."""
    pairs = [(n, r["forgetting"]) for r, n in zip(rows, names)
             if fmt.is_number((r.get("forgetting") or {}).get("after_ppl"))]
    if not pairs:
        return None
    fig, ax = _hbar_figure(round(len(pairs) * 1.5), "Forgetting: perplexity on general text")
    ys = list(range(len(pairs)))
    before = [f.get("before_ppl") or 0 for _, f in pairs]
    after = [f["after_ppl"] for _, f in pairs]
    ax.barh([y - 0.2 for y in ys], before, height=0.4, color="#c9c9c9", label="before")
    ax.barh([y + 0.2 for y in ys], after, height=0.4, color="#b2182b", label="after")
    ax.set_yticks(ys, [n for n, _ in pairs])
    for y, (_, f) in enumerate(pairs):
        note = f"{fmt.number(f['after_ppl'])} ({fmt.signed(f.get('percent'), 1)}%)"
        ax.text(f["after_ppl"] * 1.01, y + 0.2, note, va="center", fontsize=9)
    ax.set_xlim(right=max(after + before) * 1.3)
    ax.set_xlabel("perplexity (lower is better)")
    fig.legend(loc="outside lower center", fontsize=8, ncol=2, frameon=False)
    return to_svg(fig, "forgetting")


def safe_log_values(values: list) -> list[float]:
    """Values for a log axis: missing or non-positive become a tiny positive."""
    return [v if fmt.is_number(v) and v > 0 else math.nan for v in values]


def lr_search_chart(name: str, entry: dict) -> str | None:
    """One run's learning-rate search: eval metric against lr (log scale), the
    default rate dotted, the chosen one ringed."""
    points = [(c["lr"], c["value"]) for c in entry.get("candidates") or []
              if fmt.is_number(c.get("lr")) and fmt.is_number(c.get("value"))]
    if not points:
        return None
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(3.6, 2.4), layout="constrained")
        ax = fig.add_subplot()
    xs, ys = zip(*sorted(points))
    ax.plot(xs, ys, marker="o", color="#e07b39")
    ax.axvline(entry["default_lr"], color="#9a9a9a", linestyle=":", linewidth=1.2,
               label="default")
    best = [(x, y) for x, y in points if x == entry.get("best_lr")]
    if best:
        ax.plot(*best[0], marker="o", markersize=12, markerfacecolor="none",
                markeredgecolor="#b2182b", markeredgewidth=1.8, linestyle="none", label="chosen")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(xs), [f"{x:.2g}" for x in xs])
    better = "higher" if entry.get("higher_is_better") else "lower"
    ax.set_ylabel(f"eval {entry.get('metric')} ({better} is better)", fontsize=8)
    ax.set_xlabel("learning rate")
    ax.set_title(name, loc="left", fontsize=10, fontweight="bold")
    ax.legend(fontsize=7, frameon=False)
    return to_svg(fig, f"lr-{name}")
