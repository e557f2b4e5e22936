"""The report's honesty sections: the data's caveats, the baseline row of the
runs table, and per-class scores with the confusion matrix of each run.

Kept beside ``report.py`` (which places them) so the page's layout and the
figures that qualify its verdicts can change apart. Everything is derived from
the result rows (``loralab.lab.results``).
"""

from __future__ import annotations

import html

from loralab.lab import fmt
from loralab.lab import results as R


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def caveats_section(rows: list[dict]) -> str:
    """The data's caveats, in the words ``loralab train`` printed."""
    lines = R.caveats(rows)
    if not lines:
        return ""
    items = "".join(f"<li>{_esc(line)}</li>" for line in lines)
    return (f"<section id='caveats'><h2>About the data</h2><ul class='caveats note'>{items}"
            "</ul></section>")


def quality_cell(row: dict, quality: R.Quality) -> str:
    """The figure, its 95 % interval, the other figure, and the at-chance flag."""
    small = [R.interval_text(row, quality), R.secondary_text(row, quality)]
    text = "<br>".join(f"<span class='small'>{_esc(s)}</span>" for s in small if s)
    flag = (f"<br><span class='at-chance'>{_esc(R.AT_CHANCE)}</span>" if R.at_chance(row)
            else "")
    return f"{_esc(R.quality_text(row, quality))}<br>{text}{flag}"


def delta_cell(vs: dict, quality: R.Quality) -> str:
    """'+1.7 pt', 'not distinguishable at this test size' and its interval."""
    words, detail = R.difference_words(vs), R.difference_interval_text(vs, quality)
    said = f"<br><span class='words'>{_esc(words)}</span>" if words else ""
    small = f"<br><span class='small'>{_esc(detail)}</span>" if detail else ""
    return f"{_esc(R._delta_number(vs, quality))}{said}{small}"


def baseline_row(rows: list[dict], quality: R.Quality, head: tuple[str, ...]) -> str:
    """A reference row at the top of the runs table whose header is ``head``
    (run, status, then one cell per column; '{q}' is the quality column)."""
    base = R.baseline(rows, quality)
    if base is None:
        return ""
    cells = [""] * (len(head) - 2)
    other = R.ACCURACY if quality.key == "f1" else R.F1
    second = R.baseline_text(base, other)
    cells[head.index("{q}") - 2] = _esc(R.baseline_text(base, quality)) + (
        f"<br><span class='small'>{other.label} {_esc(second)}</span>" if second != "—" else "")
    if fmt.is_number(base.get("before_ppl")) and "forgetting" in head:
        cells[head.index("forgetting") - 2] = fmt.number(base["before_ppl"])  # before
    tds = "".join(f"<td class='num'>{c}</td>" for c in cells)
    return (f"<tr class='baseline'><td><i>{_esc(base['name'])}</i><br><span class='small'>"
            f"{_esc(base['detail'])}</span></td><td>reference</td>{tds}</tr>")


def _per_class_table(scores: dict) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("class", "precision", "recall", "F1", "support"))
    body = "".join(
        f"<tr><td>{_esc(lab)}</td>" + "".join(
            f"<td class='num'>{100 * s.get(k, 0):.1f}</td>" for k in ("precision", "recall", "f1"))
        + f"<td class='num'>{_esc(s.get('support'))}</td></tr>"
        for lab, s in scores["per_class"].items())
    return f"<table class='per-class'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _confusion_table(scores: dict) -> str:
    labels = list(scores["per_class"])
    head = "<th>true \\ predicted</th>" + "".join(f"<th>{_esc(lab)}</th>" for lab in labels)
    body = "".join(
        f"<tr><th>{_esc(lab)}</th>" + "".join(f"<td class='num'>{n}</td>" for n in line) + "</tr>"
        for lab, line in zip(labels, scores["confusion_matrix"]))
    return f"<table class='confusion'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def per_class_section(rows: list[dict], names: list[str]) -> str:
    """Per-class precision/recall/F1 and the confusion matrix of each finished
    classification run (the split its headline figure came from)."""
    blocks = []
    for row, name in zip(rows, names):
        scores = R.split_of(row, "f1") if row.get("status") in R.HAS_RESULTS else {}
        if not scores.get("per_class") or not scores.get("confusion_matrix"):
            continue
        blocks.append(f"<h3>{_esc(name)}</h3><div class='grid'>{_per_class_table(scores)}"
                      f"{_confusion_table(scores)}</div>")
    if not blocks:
        return ""
    positive = R.positive_label(rows)
    which = (f"The binary precision, recall and F1 above are for class '{positive}'. "
             if positive else "Precision, recall and F1 above are macro averages. ")
    note = which + "Confusion matrices: rows are the true class, columns the predicted one."
    return (f"<section id='per-class'><h2>Per class</h2><p class='note'>{_esc(note)}</p>"
            f"{''.join(blocks)}</section>")


def seeds_section(rows: list[dict], quality: R.Quality) -> str:
    """``compare --seeds N``: each method's mean ± spread over its seeds, and
    whether seeds or methods vary more."""
    summary = R.seed_summary(rows, quality)
    if summary is None:
        return ""
    items = "".join(f"<li>{_esc(line)}</li>" for line in R.seed_lines(summary, quality))
    note = ("Spread: the sample standard deviation over seeds. A seed sets the "
            "initialisation, the order of the training rows and, unless --eval-data and "
            "--test-data are given, the split itself.")
    return (f"<section id='seeds'><h2>Seeds</h2><ul class='verdict'>{items}</ul>"
            f"<p class='note'>{_esc(note)}</p></section>")
