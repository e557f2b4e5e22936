"""Memory sizes: ``24GB`` (10^9 bytes) or ``24GiB`` (2^30), and back to text."""

from __future__ import annotations

import re

from loralab.errors import LoralabError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit (B, KB, MB, GB, TB, KiB..TiB)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise LoralabError(f"cannot read the memory size {text!r}.",
                           hint="Fix: write a positive number and a unit, e.g. 24GB, "
                           "24GiB or 80GB.")
    if unit == "":  # a bare number is GB, as on a GPU's spec sheet
        unit = "GB"
    return int(float(m.group(1)) * UNITS[unit])


def format_bytes(n: float) -> str:
    """Decimal units, as published tables quote them (1 GB = 10^9 bytes)."""
    n = float(n)
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
