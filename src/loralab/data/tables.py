"""Classification tables: CSV, TSV, JSON(L), Parquet, save_to_disk dirs or hub
datasets of (text, label) rows.

The delimiter and the header are detected; TSV is read with quoting off
because real message data carries stray quote characters that would otherwise
swallow whole lines.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError


@dataclass
class Table:
    texts: list[str]
    labels: list[str]  # raw label strings, mapped to ids by LabelMap
    source: str
    skipped: int = 0  # rows without text or label


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 file (BOM allowed); one-line errors for the usual problems."""
    path = Path(path)
    if not path.exists():
        raise LoralabError(f"data file {path} not found. Check the path.")
    if not path.is_file():
        raise LoralabError(f"data path {path} is not a file. Pass a file, not a folder.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise LoralabError(
            f"{path} is not UTF-8: byte 0x{raw[err.start]:02x} at line {line}. "
            "Re-save the file as UTF-8.") from None
    if not text.strip():
        raise LoralabError(f"data file {path} is empty. Give a file with data rows.")
    return text


def read_table(path: str | Path, text_column: str = "text", label_column: str = "label",
               split: str | None = None, config: str | None = None) -> Table:
    """Read a classification table; columns by name or by 0-based index."""
    from loralab.data.sources import read_records, source_kind

    kind = source_kind(str(path))
    if kind == "text":
        raise LoralabError(
            f"{path} is plain text, not a classification table.",
            hint="Fix: give a CSV/TSV/JSON/JSONL/Parquet table with text and label columns, "
                 "or pass --task lm to train a language model on the text.")
    if kind in ("csv", "tsv"):
        text = read_text_file(path)
        rows, columns = delimited_rows(text, Path(path).suffix.lower(), text_column, label_column)
    else:
        recs = read_records(str(path), split, config)
        rows, columns = [[r.get(c) for c in recs.fields] for r in recs.rows], recs.fields
    return _pick_columns(rows, columns, path, text_column, label_column)


def _pick_columns(rows, columns, path, text_column, label_column) -> Table:
    ti = _column_index(columns, text_column, path, "text")
    li = _column_index(columns, label_column, path, "label")
    texts, labels, skipped = [], [], 0
    for row in rows:
        t = str(row[ti]).strip() if ti < len(row) and row[ti] is not None else ""
        lab = str(row[li]).strip() if li < len(row) and row[li] is not None else ""
        if not t or not lab:
            skipped += 1
            continue
        texts.append(t)
        labels.append(lab)
    if not texts:
        raise LoralabError(f"{path} has no rows with both a text and a label "
                           f"(columns: {', '.join(map(repr, columns))}). Check the columns.")
    return Table(texts, labels, str(path), skipped)


def sniff_delimiter(sample: str, suffix: str) -> str:
    if suffix == ".tsv":
        return "\t"
    lines = [ln for ln in sample.splitlines()[:20] if ln.strip()]
    best, best_score = ",", -1
    for delim in ("\t", ",", ";", "|"):
        counts = [ln.count(delim) for ln in lines]
        # a delimiter present on every line scores by its consistency
        score = min(counts) if counts else 0
        if score > best_score:
            best, best_score = delim, score
    return best


def delimited_rows(text: str, suffix: str, text_column: str | None,
                   label_column: str | None):
    """(rows, column names); ``None`` columns: the first row is the header."""
    delim = sniff_delimiter(text[:20000], suffix)
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    rows = list(csv.reader(io.StringIO(text), delimiter=delim, quoting=quoting))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if text_column is None or _has_header(rows, text_column, label_column):
        return rows[1:], [c.strip() for c in rows[0]]
    width = max(len(r) for r in rows)
    return rows, [str(i) for i in range(width)]


def _has_header(rows: list[list[str]], text_column: str, label_column: str) -> bool:
    """The first row is a header if it names a requested column, or if its cells
    look like names: short, and not repeated as values further down the column
    (a label such as 'ham' recurs; a column name does not)."""
    first = [c.strip() for c in rows[0]]
    if any(str(c) in first for c in (text_column, label_column) if not str(c).isdigit()):
        return True
    if len(rows) < 2 or any(len(c) > 40 or not c for c in first):
        return False
    for col, name in enumerate(first):
        if any(len(r) > col and r[col].strip() == name for r in rows[1:1000]):
            return False
    return True


def _column_index(columns: list[str], wanted: str, path, role: str) -> int:
    wanted = str(wanted)
    if wanted in columns:
        return columns.index(wanted)
    if wanted.isdigit() and int(wanted) < len(columns):
        return int(wanted)
    found = ", ".join(repr(c) for c in columns)
    raise LoralabError(
        f"{path} has no {role} column {wanted!r}; columns found: {found}. "
        f"Pass --{role}-column NAME (or a 0-based index).")
