"""``report.html``: one self-contained page that a person reads at a glance.

Inline CSS and inline SVG charts only: no scripts, no external files, so the page
opens offline and from an e-mail attachment. Everything shown is derived from
the result rows (``loralab.lab.results``) and the metadata passed in.
"""

from __future__ import annotations

import html
import os

from loralab.io import atomic_write_text
from loralab.lab import charts, fmt
from loralab.lab import report_quality as Q
from loralab.lab import results as R

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid
#d9dde3;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5b6372;margin:0 0 8px}
.verdict{background:#fff;border:1px solid #d9dde3;border-left:4px solid #e07b39;padding:10px 16px
 10px 30px;margin:0;border-radius:4px}
.verdict li{margin:4px 0;font-size:15px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #d9dde3;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.small{color:#5b6372;font-size:11px}
.failed td{background:#fdecec}.status-failed{color:#b2182b;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
figure.chart{background:#fff;border:1px solid #d9dde3;border-radius:4px;margin:0;padding:8px}
figure.chart svg{width:100%;height:auto}
pre{background:#1d2330;color:#f1f3f6;padding:10px 14px;border-radius:4px;overflow-x:auto;
white-space:pre-wrap;word-break:break-all}
.gen td{max-width:520px;white-space:pre-wrap}.gen th{width:160px}
.note{color:#5b6372;font-size:13px;max-width:900px}
.at-chance{color:#b2182b;font-weight:600}.baseline td{background:#f3f4f7;font-style:italic}
td .words{white-space:normal;display:inline-block;max-width:150px;text-align:right}
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def figure(chart_id: str, svg: str | None, caption: str = "") -> str:
    if not svg:
        return ""
    cap = f"<figcaption class='small'>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure class='chart' id='chart-{chart_id}' data-chart='{chart_id}'>{svg}{cap}</figure>"


def header(meta: dict, rows: list[dict]) -> str:
    title = meta.get("title") or "loralab comparison"
    bits = [meta.get("model"), meta.get("task"), meta.get("data"),
            f"{len(R.ok_rows(rows))} of {len(rows)} runs finished", meta.get("created")]
    sub = " · ".join(esc(b) for b in bits if b)
    return f"<h1>{esc(title)}</h1><p class='sub'>{sub}</p>"


def verdict_section(rows: list[dict], names: list[str], quality: R.Quality) -> str:
    full = R.reference_row(rows)
    lines = [R.verdict(r, R.reference_for(r, rows), quality, n) for r, n in zip(rows, names)
             if r.get("status") in R.HAS_RESULTS and r is not R.reference_for(r, rows)]
    if full is not None:
        q = R.quality_text(full, quality)
        forgot = (full.get("forgetting") or {}).get("percent")
        tail = (f", general-text perplexity {fmt.signed(forgot, 1)}%"
                if fmt.is_number(forgot) else "")
        span = R.interval_text(full, quality)
        chance = f", {R.AT_CHANCE}" if R.at_chance(full) else ""
        lines.insert(0, f"Reference, full fine-tuning: {fmt.count(full.get('trainable_params'))}"
                        f" trainable parameters, {fmt.seconds(full.get('train_seconds'))},"
                        f" {quality.label} {q}{f' ({span})' if span else ''}{tail}{chance}")
    failed = [n for r, n in zip(rows, names) if r.get("status") == "failed"]
    if failed:
        lines.append(f"Failed: {', '.join(failed)} (errors below)")
    if not lines:
        return ""
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return f"<section id='verdict'><h2>At a glance</h2><ul class='verdict'>{items}</ul></section>"

TABLE_HEAD = ("run", "status", "trainable params", "train time", "tokens/s", "peak memory",
              "artifact", "{q}", "vs full FT", "forgetting", "speed-up", "memory vs full")


def _memory_cell(row: dict) -> str:
    mem = R.memory_breakdown(row)
    if mem is None:
        return "—"
    detail = " · ".join(f"{R.MEMORY_LABELS[k]} {fmt.nbytes(mem[k])}" for k in R.MEMORY_PARTS
                        if k in mem and (mem[k] or k in ("weights", "other")))
    return f"{fmt.nbytes(mem['peak'])}<br><span class='small'>{esc(detail)}</span>"


def _forgetting_cell(row: dict) -> str:
    f = row.get("forgetting") or {}
    if not fmt.is_number(f.get("after_ppl")):
        return "—"
    return (f"{fmt.number(f.get('before_ppl'))} → {fmt.number(f['after_ppl'])}"
            f"<br><span class='small'>{esc(fmt.signed(f.get('percent'), 1))}%</span>")


def run_cells(row: dict, full: dict | None, quality: R.Quality) -> list[str]:
    vs = R.versus_full(row, full, quality)
    params = (f"{fmt.count(row.get('trainable_params'))}<br><span class='small'>"
              f"{fmt.percent(row.get('trainable_percent'), 2)}</span>")
    return [params, fmt.seconds(row.get("train_seconds")),
            fmt.count(row.get("tokens_per_second")), _memory_cell(row),
            fmt.nbytes(row.get("artifact_bytes")),
            Q.quality_cell(row, quality),
            Q.delta_cell(vs, quality), _forgetting_cell(row), fmt.ratio(vs.get("speedup")),
            fmt.ratio(vs.get("memory_ratio"))]


def _lr_note(row: dict, lr_search: dict) -> str:
    """'lr 1e-03, tuned: best of 3' under a run's name (which rate the row used)."""
    lr = R.spec_of(row).get("lr")
    if not fmt.is_number(lr):
        return ""
    entry = lr_search.get(row.get("run"))
    if not entry:
        return f"lr {lr:.3g}"
    tried = sum(c["value"] is not None for c in entry["candidates"])
    return f"lr {lr:.3g}, tuned: best of {tried} (default {entry['default_lr']:.3g})"


def runs_table(rows: list[dict], names: list[str], quality: R.Quality,
               lr_search: dict | None = None) -> str:
    full = R.reference_row(rows)
    head = "".join(f"<th>{esc(h.format(q=R.quality_header(rows, quality)))}</th>"
                   for h in TABLE_HEAD)
    body = [Q.baseline_row(rows, quality, TABLE_HEAD)]
    for row, name in zip(rows, names):
        status = row.get("status", "?")
        shown = {"ok": "done", "skipped": "done earlier"}.get(status, status)
        cells = (run_cells(row, R.reference_for(row, rows) or full, quality)
                 if status in R.HAS_RESULTS
                 else [f"<span class='small'>{esc(row.get('error'))}</span>"])
        span = "" if status in R.HAS_RESULTS else f" colspan='{len(TABLE_HEAD) - 2}'"
        tds = "".join(f"<td class='num'>{c}</td>" for c in cells) if not span else \
            f"<td{span}>{cells[0]}</td>"
        cls = " class='failed'" if status == "failed" else ""
        lr = _lr_note(row, lr_search or {})
        lr = f"<br><span class='small lr'>{esc(lr)}</span>" if lr else ""
        body.append(f"<tr{cls}><td>{esc(name)}<br><span class='small'>{esc(row.get('run'))}"
                    f"</span>{lr}</td><td class='status-{esc(status)}'>{esc(shown)}</td>{tds}</tr>")
    note = ("Quality is measured on the test split (the eval split when no test split "
            "exists), with its 95% bootstrap interval over the test rows; 'vs full FT' is "
            "judged by the paired bootstrap of the difference on the same rows; 'at chance' "
            "means the F1 interval reaches the baseline of one constant answer. "
            "Peak memory: process peak RSS on CPU, peak allocated on CUDA; "
            "w/g/o = weights, gradients, optimizer state counted tensor by tensor, "
            "other = the rest (activations, framework).")
    return (f"<section id='runs'><h2>Runs</h2><table class='runs'><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(body)}</tbody></table><p class='note'>{esc(note)}</p>"
            "</section>")


def _bars(done: list[dict], names: list[str], quality: R.Quality) -> list[str]:
    full = R.reference_row(done)
    cols = [charts.color(r) for r in done]
    params = [r.get("trainable_params") or 0 for r in done]
    times = [r.get("train_seconds") or 0 for r in done]
    quals = [charts._plot_value(r, quality) or 0 for r in done]
    speed = [R.versus_full(r, full, quality).get("speedup") for r in done]
    return [
        figure("params", charts.hbar(
            names, charts.safe_log_values(params), cols, "Trainable parameters",
            "trainable parameters (log scale)",
            [f"{fmt.count(p)} ({fmt.percent(r.get('trainable_percent'), 2)})"
             for p, r in zip(params, done)], log=True)),
        figure("memory", charts.memory_stack(
            [n for n, m in zip(names, map(R.memory_breakdown, done)) if m],
            [m for m in map(R.memory_breakdown, done) if m], "Peak memory")),
        figure("time", charts.hbar(
            names, times, cols, "Training time", "seconds",
            [fmt.seconds(t) + (f" ({fmt.ratio(s)} vs full)" if s else "")
             for t, s in zip(times, speed)])),
        figure("quality", charts.hbar(
            names, quals, cols, f"Quality: {quality.label}",
            f"{quality.label}{' (points)' if quality.points else ''}"
            f"{'' if quality.higher_is_better else ', lower is better'}",
            [R.quality_text(r, quality) for r in done],
            intervals=[R.shown_interval(r, quality) for r in done])),
    ]


def charts_section(rows: list[dict], names: list[str], quality: R.Quality) -> str:
    pairs = [(r, n) for r, n in zip(rows, names) if r.get("status") in R.HAS_RESULTS]
    if not pairs:
        return ""
    done, done_names = [p[0] for p in pairs], [p[1] for p in pairs]
    figs = _bars(done, done_names, quality)
    loss = figure("loss", charts.loss_curves(done, done_names)) \
        if any(r.get("loss_curve") for r in done) else ""
    return (f"<section id='charts'><h2>Cost and quality</h2><div class='grid'>{''.join(figs)}"
            f"</div></section><section id='loss'><h2>Loss curves</h2><div class='grid'>{loss}"
            "</div></section>")


def sweep_section(rows: list[dict], quality: R.Quality) -> str:
    figs = [figure(f"sweep-{k}", charts.sweep_curve(rows, quality, k))
            for k in ("rank", "trainable_params")]
    if not any(figs):
        return ""
    note = ("Each line fixes everything but the rank; dashed: full fine-tuning, "
            "dotted: head only.")
    return (f"<section id='sweep'><h2>Sweep</h2><div class='grid'>{''.join(figs)}</div>"
            f"<p class='note'>{esc(note)}</p></section>")


def variant_costs(rows: list[dict], names: list[str], quality: R.Quality) -> list[dict]:
    """Each LoRA variant against plain LoRA at the same rank (QDoRA against QLoRA):
    time, tokens/s, peak memory and trainable-parameter ratios, quality delta."""
    done = [(r, n) for r, n in zip(rows, names) if r.get("status") in R.HAS_RESULTS]
    plain = {(R.spec_of(r).get("method"), R.spec_of(r).get("rank")): r for r, _ in done
             if R.spec_of(r).get("variant") in ("lora", "qlora")}
    out = []
    for row, name in done:
        spec = R.spec_of(row)
        ref = plain.get((spec.get("method"), spec.get("rank")))
        if ref is None or ref is row or spec.get("method") not in ("lora", "qlora"):
            continue
        q, q_ref = R.metric_value(row, quality.key), R.metric_value(ref, quality.key)
        mem, mem_ref = R.memory_breakdown(row), R.memory_breakdown(ref)
        delta = q - q_ref if q is not None and q_ref is not None else None
        out.append({"name": name, "reference": fmt.method_name(spec["method"]),
                    "time": R._div(row.get("train_seconds"), ref.get("train_seconds")),
                    "tokens": R._div(row.get("tokens_per_second"), ref.get("tokens_per_second")),
                    "memory": R._div(mem and mem["peak"], mem_ref and mem_ref["peak"]),
                    "params": R._div(row.get("trainable_params"), ref.get("trainable_params")),
                    "delta": delta * 100 if delta is not None and quality.points else delta})
    return out


def _delta(value, unit: str) -> str:
    return fmt.signed(value, 2) + unit if fmt.is_number(value) else "—"


def variants_section(rows: list[dict], names: list[str], quality: R.Quality) -> str:
    costs = variant_costs(rows, names, quality)
    if not costs:
        return ""
    unit = " pt" if quality.points else ""
    body = "".join(
        f"<tr><td>{esc(c['name'])}</td><td>{esc(c['reference'])}</td>"
        + "".join(f"<td class='num'>{fmt.ratio(c[k])}</td>"
                  for k in ("time", "tokens", "memory", "params"))
        + f"<td class='num'>{esc(_delta(c['delta'], unit))}</td></tr>" for c in costs)
    head = "".join(f"<th>{h}</th>" for h in ("run", "vs", "train time", "tokens/s",
                                             "peak memory", "trainable params",
                                             esc(quality.label)))
    note = ("Each variant against plain LoRA (QDoRA against QLoRA) at the same rank, same "
            "seed and data: ratios above 1× cost more time, memory or parameters. DoRA's "
            "extra cost is the weight norm of W + BA per step; PiSSA/OLoRA cost an SVD/QR "
            "once at the start.")
    return (f"<section id='variants'><h2>Variants against plain LoRA</h2><table class='variants'>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p class='note'>{esc(note)}</p></section>")


def lr_search_section(lr_search: dict, rows: list[dict], names: list[str]) -> str:
    if not lr_search:
        return ""
    label = {r.get("run"): n for r, n in zip(rows, names)}
    figs = [figure(f"lr-{run}", charts.lr_search_chart(label.get(run, run), entry))
            for run, entry in lr_search.items()]
    first = next(iter(lr_search.values()))
    factors = ", ".join(f"{c['factor']:.3g}" for c in first["candidates"])
    note = (f"Before the comparison, each run was trained at a few learning rates around its "
            f"default (x {factors}) for a "
            f"fraction of its steps, same seed, and scored by {first['metric']} on the eval "
            "split; the rows above were trained at the best (marked). Published comparisons "
            "tune the rate per method the same way (Biderman et al., 2024).")
    return (f"<section id='lr-search'><h2>Learning-rate search</h2><p class='note'>"
            f"{esc(note)}</p><div class='grid'>{''.join(figs)}</div></section>")


def forgetting_section(rows: list[dict], names: list[str]) -> str:
    svg = charts.forgetting_bars(rows, names)
    if not svg:
        return ""
    note = ("Perplexity of each fine-tuned model on general text it was not trained on, "
            "before and after fine-tuning: a rise is forgetting (Biderman et al., 2024, "
            "'LoRA Learns Less and Forgets Less').")
    return (f"<section id='forgetting'><h2>Forgetting</h2><div class='grid'>"
            f"{figure('forgetting', svg)}</div><p class='note'>{esc(note)}</p></section>")


def generations_section(generations: list[dict], names_by_run: dict[str, str]) -> str:
    if not generations:
        return ""
    blocks = []
    for i, gen in enumerate(generations, 1):
        rows = [("reference", gen.get("reference"))] if gen.get("reference") else []
        rows += [(names_by_run.get(k, k), v) for k, v in (gen.get("outputs") or {}).items()]
        trs = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
        blocks.append(f"<h3>Prompt {i}</h3><table class='gen'><tr><th>prompt</th><td>"
                      f"{esc(gen.get('prompt'))}</td></tr>{trs}</table>")
    note = "Held-out prompts, greedy decoding, the same token budget for every model."
    return (f"<section id='generations'><h2>Generations side by side</h2>"
            f"<p class='note'>{esc(note)}</p>{''.join(blocks)}</section>")


def export_section(export: dict | None, rows: list[dict], names: list[str]) -> str:
    """The best run as GGUF (`compare --export gguf`): size and measured quality
    beside the run's own artifact and perplexity."""
    if not export:
        return ""
    name = dict(zip((r.get("run") for r in rows), names)).get(export["run"], export["run"])
    cells = [("run", name), ("artifact (adapter / model)", fmt.nbytes(export["artifact_bytes"])),
             (f"GGUF {export['quant']}", fmt.nbytes(export["bytes"])),
             ("general-text perplexity, merged", fmt.number(export["ppl_merged"])),
             ("general-text perplexity, GGUF", (f"{fmt.number(export['ppl_gguf'])} "
              f"({fmt.signed(export['ppl_change_pct'], 2)}%)")),
             ("max |logit diff|", fmt.number(export["max_abs_logit_diff"])),
             ("greedy continuations equal", export["greedy_prompts_equal"]),
             ("check", f"{export['criterion']}: {'passed' if export['passed'] else 'FAILED'}"),
             ("file", export["file"])]
    trs = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in cells)
    note = ("The file was read back with transformers' GGUF loader and compared with the "
            "merged model (docs/export.md); an Ollama Modelfile lies beside it.")
    return (f"<section id='export'><h2>Export (GGUF)</h2><table class='gen'>{trs}</table>"
            f"<p class='note'>{esc(note)}</p></section>")


def failures_section(rows: list[dict], names: list[str]) -> str:
    failed = [(n, r) for r, n in zip(rows, names) if r.get("status") == "failed"]
    if not failed:
        return ""
    items = "".join(f"<h3>{esc(n)}</h3><pre>{esc(r.get('error'))}</pre>" for n, r in failed)
    hint = "Run the same command again to redo only the failed runs."
    return f"<section id='failures'><h2>Failed runs</h2><p class='note'>{hint}</p>{items}</section>"


def environment_section(meta: dict) -> str:
    env = meta.get("environment") or {}
    trs = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in env.items())
    settings = meta.get("settings") or {}
    strs = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in settings.items())
    command = meta.get("command") or ""
    return (f"<section id='environment'><h2>Environment and reproduction</h2><div class='grid'>"
            f"<table class='env'>{trs}</table><table class='settings'>{strs}</table></div>"
            f"<h3>Command</h3><pre id='command'><code>{esc(command)}</code></pre></section>")


def build_report(rows: list[dict], meta: dict) -> str:
    """The whole page as a string."""
    quality = R.headline_quality(rows)
    names = R.labels(rows)
    names_by_run = {r.get("run"): n for r, n in zip(rows, names)}
    names_by_run.setdefault("base", "base model")
    body = "".join([
        header(meta, rows),
        verdict_section(rows, names, quality),
        Q.caveats_section(rows),
        Q.seeds_section(rows, quality),
        runs_table(rows, names, quality, meta.get("lr_search")),
        Q.per_class_section(rows, names),
        variants_section(rows, names, quality),
        lr_search_section(meta.get("lr_search") or {}, rows, names),
        charts_section(rows, names, quality),
        sweep_section(rows, quality),
        forgetting_section(rows, names),
        generations_section(meta.get("generations") or [], names_by_run),
        export_section(meta.get("export"), rows, names),
        failures_section(rows, names),
        environment_section(meta),
    ])
    title = esc(meta.get("title") or "loralab comparison")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{title}</title><style>{CSS}</style></head><body><main>{body}</main>"
            "</body></html>\n")


def write_report(path: str | os.PathLike, rows: list[dict], meta: dict) -> None:
    """Write ``report.html`` atomically: a reader never sees half a page."""
    atomic_write_text(path, build_report(rows, meta))
