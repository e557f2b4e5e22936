"""Small formatters shared by the console table, the CSV and the HTML report."""

from __future__ import annotations

import math

METHOD_NAMES = {"full": "full FT", "head": "head only", "lora": "LoRA", "qlora": "QLoRA",
                "dora": "DoRA", "qdora": "QDoRA", "pissa": "PiSSA", "olora": "OLoRA",
                "rslora": "rsLoRA", "lora-plus": "LoRA+"}


def method_name(variant) -> str:
    """'dora+rslora' -> 'DoRA+rsLoRA'."""
    return "+".join(METHOD_NAMES.get(p, p) for p in str(variant).split("+"))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count(n) -> str:
    """12_345_678 -> '12.3M'."""
    if not is_number(n):
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def nbytes(n) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    if not is_number(n):
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def seconds(s) -> str:
    if not is_number(s):
        return "—"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def percent(p, digits: int = 2) -> str:
    if not is_number(p):
        return "—"
    if p != 0 and abs(p) < 10 ** -digits:
        return f"{p:.2g}%"
    return f"{p:.{digits}f}%"


def number(x, digits: int = 3) -> str:
    if not is_number(x):
        return "—"
    return f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def signed(x, digits: int = 1, unit: str = "") -> str:
    """Signed difference with a real minus sign: -0.4 -> '−0.4 pt'."""
    if not is_number(x):
        return "—"
    text = f"{abs(x):.{digits}f}"
    sign = "+" if x > 0 else ("−" if x < 0 and float(text) != 0 else "±")
    return f"{sign}{text}{(' ' + unit) if unit else ''}"


def ratio(x) -> str:
    """A multiplicative ratio: 2.94 -> '2.9×'."""
    if not is_number(x):
        return "—"
    return f"{x:.2g}×" if x < 10 else f"{x:.0f}×"
