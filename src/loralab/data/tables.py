"""Classification tables: CSV, TSV or JSONL files of (text, label) rows.

The delimiter and the header are detected; TSV is read with quoting off
because real message data carries stray quote characters that would otherwise
swallow whole lines.
"""

from __future__ import annotations

import csv
import io
import json
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


def read_table(path: str | Path, text_column: str = "text",
               label_column: str = "label") -> Table:
    """Read a classification table; columns by name or by 0-based index."""
    text = read_text_file(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json") or text.lstrip()[:1] in ("{", "["):
        rows, columns = _json_rows(text, path)
    else:
        rows, columns = _delimited_rows(text, suffix, text_column, label_column)
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
        raise LoralabError(f"{path} has no rows with both a text and a label. Check the columns.")
    return Table(texts, labels, str(path), skipped)


def _json_rows(text: str, path) -> tuple[list[list], list[str]]:
    records = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise LoralabError(f"{path} is not valid JSON (line {err.lineno}). Fix the file.")
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise LoralabError(f"{path} line {n} is not valid JSON. Fix or remove it.")
    if not all(isinstance(r, dict) for r in records):
        raise LoralabError(f"{path}: every JSON record must be an object with named fields.")
    columns = list(dict.fromkeys(k for r in records for k in r))
    return [[r.get(c) for c in columns] for r in records], columns


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


def _delimited_rows(text: str, suffix: str, text_column: str, label_column: str):
    delim = sniff_delimiter(text[:20000], suffix)
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    rows = list(csv.reader(io.StringIO(text), delimiter=delim, quoting=quoting))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if _has_header(rows, text_column, label_column):
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
