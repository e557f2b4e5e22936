"""Language-model data: documents from a plain-text file or ``text`` records.

A ``.txt`` file's documents are its paragraphs (blank-line separated, inner
line breaks kept); a file with no blank line has one document per line
(WikiText-style corpora, where each line is a paragraph). Each record of a
table is one document. ``encode.encode_documents`` packs them with EOS between.
"""

from __future__ import annotations

import re

from loralab.data.fields import option
from loralab.data.sources import fields_found, read_records, source_kind
from loralab.errors import LoralabError

BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    parts = BLANK_LINE.split(text) if BLANK_LINE.search(text) else text.split("\n")
    return [p.strip() for p in parts if p.strip()]


def read_documents(data: str, options=None) -> list[str]:
    """The documents of ``data`` (a text file, or records with a text field)."""
    if source_kind(data) == "text":
        from loralab.data.tables import read_text_file

        return paragraphs(read_text_file(data))
    recs = read_records(data, option(options, "data_split"), option(options, "data_config"))
    field = str(option(options, "text_column") or "text")
    if field not in recs.fields:
        raise LoralabError(f"{data} has no text field {field!r} for --task lm; fields found: "
                           f"{fields_found(recs.fields)}.",
                           hint="Fix: pass --text-column NAME (the field holding the text).")
    docs = [str(r[field]).strip() for r in recs.rows if r.get(field) is not None]
    docs = [d for d in docs if d]
    if not docs:
        raise LoralabError(f"{data} has no non-empty {field!r} text.",
                           hint="Fix: give records with text.")
    return docs
