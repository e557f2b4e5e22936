"""Where data comes from: a file (told by its extension, else by its content),
a directory written by ``datasets.Dataset.save_to_disk``, or a Hugging Face
dataset id. Every reader returns named fields, so every error can list them.

Public API:
    source_kind(data) -> "csv" | "tsv" | "json" | "jsonl" | "parquet" | "text" | "disk" | "hub"
    read_records(data, split=None, config=None) -> Records
    peek_fields(data, split=None, config=None) -> list[str]  (cheap: schema or first records)
    fields_found(fields) -> "'a', 'b'" for messages
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from loralab.errors import LoralabError

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
            ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".txt": "text",
            ".text": "text"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PEEK_RECORDS = 200  # JSONL records read to tell the task (all fields of a big file are not)


@dataclass
class Records:
    rows: list[dict]
    fields: list[str]
    source: str


def fields_found(fields) -> str:
    return ", ".join(repr(str(f)) for f in fields) or "none"


def source_kind(data: str) -> str:
    path = Path(data)
    if path.is_dir():
        return "disk"
    if path.is_file():
        return SUFFIXES.get(path.suffix.lower()) or _sniff_content(path)
    if HUB_ID.match(data) and path.suffix.lower() not in SUFFIXES and not data.startswith("."):
        return "hub"
    raise LoralabError(f"data file {data} not found.",
                       hint="Fix: check the path, or give a Hugging Face dataset id (org/name).")


def _sniff_content(path: Path) -> str:
    """No known extension: Parquet by its magic bytes, JSON by its first
    character, a delimited table when one delimiter is on every one of the first
    lines (the SMS collection's bare name), else plain text (WikiText's .raw)."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text[:1] in ("[", "{"):
        return "json" if text[:1] == "[" else "jsonl"
    lines = [ln for ln in text.splitlines()[:20] if ln.strip()][:-1] or text.splitlines()[:1]
    delimited = any(all(d in ln for ln in lines) for d in ("\t", ",", ";", "|"))
    return "csv" if lines and delimited else "text"


def read_records(data: str, split: str | None = None, config: str | None = None) -> Records:
    """Every row of ``data`` as a dict (CSV/TSV need a header row)."""
    kind = source_kind(data)
    if kind in ("json", "jsonl"):
        from loralab.data.tables import read_text_file

        return _records(json_records(read_text_file(data), data), data)
    if kind == "parquet":
        return _parquet(data)
    if kind in ("disk", "hub"):
        ds = load_disk(data, split) if kind == "disk" else load_hub(data, split, config)
        return Records(ds.to_list(), list(ds.column_names), data)
    if kind in ("csv", "tsv"):
        return _delimited_records(data)
    raise LoralabError(f"{data} is plain text, not records with named fields.",
                       hint="Fix: use --task lm to train on plain text, or give a table "
                            "(CSV/TSV/JSON/JSONL/Parquet).")


def peek_fields(data: str, split: str | None = None, config: str | None = None) -> list[str]:
    """The field names, reading as little as it takes (a schema, the first records)."""
    kind = source_kind(data)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(data).names)
    if kind == "jsonl":
        from loralab.data.tables import read_text_file

        lines = [ln for ln in read_text_file(data).splitlines() if ln.strip()][:PEEK_RECORDS]
        return _records(json_records("\n".join(lines), data), data).fields
    if kind == "text":
        return []
    return read_records(data, split, config).fields


def _records(rows: list, source: str) -> Records:
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise LoralabError(f"{source} record {bad + 1} is not a JSON object.",
                           hint="Fix: every record must be an object with named fields.")
    return Records(rows, list(dict.fromkeys(k for r in rows for k in r)), source)


def json_records(text: str, source) -> list:
    """A JSON list or JSONL lines (one object per line)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            raise LoralabError(f"{source} is not valid JSON (line {err.lineno}).",
                               hint="Fix the file.") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise LoralabError(f"{source} line {n} is not valid JSON.",
                                   hint="Fix: one JSON object per line (JSONL), or a JSON "
                                        "list.") from None
    return rows


def _parquet(path: str) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as err:
        raise LoralabError(f"{path} is not a readable Parquet file "
                           f"({str(err).splitlines()[0]}).", hint="Fix: re-write the file.") from None
    if table.num_rows == 0:
        raise LoralabError(f"Parquet file {path} has no rows (columns: "
                           f"{fields_found(table.column_names)}).",
                           hint="Fix: give a file with data rows.")
    return Records(table.to_pylist(), list(table.column_names), path)


def _delimited_records(path: str) -> Records:
    from loralab.data.tables import delimited_rows, read_text_file

    rows, columns = delimited_rows(read_text_file(path), Path(path).suffix.lower(), None, None)
    return Records([dict(zip(columns, r)) for r in rows], columns, path)


def _pick_split(dsd, split: str | None, source: str):
    names = list(dsd.keys())
    want = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if want not in names:
        raise LoralabError(f"{source} has splits {fields_found(names)}"
                           + (f", not {split!r}." if split else "; which one?"),
                           hint="Fix: pass --data-split NAME.")
    return dsd[want]


def load_disk(path: str, split: str | None = None):
    """A Dataset (or one split of a DatasetDict) written by ``save_to_disk``."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        inside = ", ".join(sorted(p.name for p in Path(path).iterdir())[:8]) or "nothing"
        raise LoralabError(f"{path} is a directory, but not one written by "
                           f"datasets.save_to_disk (it holds: {inside}).",
                           hint="Fix: pass a data file, or the directory save_to_disk wrote.")
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, path)
    return _nonempty(ds, path)


def _nonempty(ds, source: str):
    if len(ds) == 0:
        raise LoralabError(f"{source} has no rows (fields: {fields_found(ds.column_names)}).",
                           hint="Fix: give data with rows.")
    return ds


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint: ``datasets`` itself retries for ~25 s."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hub(name: str, split: str | None = None, config: str | None = None):
    """``datasets.load_dataset(name, config, split)``; offline mode reads the cache."""
    fix = ("Fix: download the data and pass --data FILE (or a save_to_disk dir), or set "
           "HF_HUB_OFFLINE=1 to use a cached copy.")
    if not _offline() and not hub_reachable():
        raise LoralabError(f"{name!r} is not a local file, and the Hugging Face hub is "
                           "unreachable to fetch it as a dataset id.", hint=fix)
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        first = str(err).splitlines()[0]
        raise LoralabError(f"dataset {name!r} could not be loaded ({first}).", hint=fix) from None
    except ValueError as err:  # an unknown config or split: datasets lists the valid ones
        raise LoralabError(f"dataset {name!r}: {str(err).splitlines()[0]}",
                           hint="Fix: pass --data-config NAME / --data-split NAME.") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, name)
    return _nonempty(ds, name)
