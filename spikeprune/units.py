"""Memory sizes as people write them ("8MB", "512KiB", "1.5 GB", "123456") <-> bytes, and the one
set of number formatters every report, table and log line uses (format_bytes, format_count,
format_number, format_percent; each writes '-' for a missing value).

Decimal and binary units are both accepted and never confused, because a budget that is silently
5% off (MB vs MiB) defeats the point of a memory budget:

    B                         1 byte
    kB, KB, MB, GB, TB        decimal (SI): 1000, 1000**2, 1000**3, 1000**4 bytes
    KiB, MiB, GiB, TiB        binary (IEC): 1024, 1024**2, 1024**3, 1024**4 bytes

Matching is case-insensitive ("8mb" == "8MB", "1gib" == "1GiB") and every unit counts bytes, never
bits. A bare number is bytes. Bare prefixes ("8M", "512K") are refused: they are ambiguous
between the two families, and the error message names both readings.
"""
from __future__ import annotations

import math
import re

from .errors import SpikepruneError

DECIMAL = {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
BINARY = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
UNITS = {"": 1, "b": 1, **DECIMAL, **BINARY}

_PATTERN = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: str | int | float) -> int:
    """Parse a memory size into a whole number of bytes (rounded to the nearest byte, at least 1).

    Accepts ints / floats (bytes) and strings with an optional unit from the table in the module
    docstring. Raises SpikepruneError naming the accepted units on anything else.
    """
    if isinstance(value, bool):  # bool is an int subclass; True bytes is never what anyone meant
        raise SpikepruneError(f"memory size must be a number of bytes or a string like '8MB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit, text = float(value), "", repr(value)
    else:
        text = str(value)
        m = _PATTERN.match(text)
        if not m:
            raise SpikepruneError(
                f"cannot read memory size {text!r}: write a positive number with an optional unit, e.g. "
                "'8MB' (8,000,000 bytes), '8MiB' (8,388,608 bytes), '512KiB', '1.5GB' or plain bytes")
        number, unit = float(m.group(1)), m.group(2).lower()
    if unit not in UNITS:
        raise SpikepruneError(_unknown_unit_message(text, number, unit))
    if not math.isfinite(number) or number <= 0:
        raise SpikepruneError(f"memory size must be positive and finite, got {text!r}")
    n = round(number * UNITS[unit])
    if n < 1:
        raise SpikepruneError(f"memory size {text!r} is less than one byte")
    return int(n)


def _unknown_unit_message(text: str, number: float, unit: str) -> str:
    families = {"k": ("kB", "KiB"), "m": ("MB", "MiB"), "g": ("GB", "GiB"), "t": ("TB", "TiB")}
    if unit in families:  # a bare prefix: say what each reading would mean
        dec, binu = families[unit]
        return (f"memory size {text!r} is ambiguous: write {number:g}{dec} ({number * DECIMAL[dec.lower()]:,.0f} "
                f"bytes) or {number:g}{binu} ({number * BINARY[binu.lower()]:,.0f} bytes)")
    if unit.endswith("bit") or unit.endswith("bits"):
        return f"memory size {text!r} is in bits; give bytes instead (e.g. '8MB')"
    return (f"unknown unit {unit!r} in memory size {text!r}; use B, kB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024)")


MISSING = "-"  # what a table shows for a value that was not measured


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def format_bytes(n: int | float | None, binary: bool = False, digits: int = 2) -> str:
    """A short human reading of `n` bytes: '12.35 MB' (decimal, default) or '11.78 MiB' (binary).

    Under 1000 (1024) bytes the count is whole: '999 B'. None or a non-finite value gives '-'."""
    if _missing(n):
        return MISSING
    base, names = (1024, ["B", "KiB", "MiB", "GiB", "TiB"]) if binary else (1000, ["B", "kB", "MB", "GB", "TB"])
    sign, x = ("-" if n < 0 else ""), abs(float(n))
    for name in names:
        if x < base or name == names[-1]:
            return f"{sign}{x:.0f} B" if name == "B" else f"{sign}{x:.{digits}f} {name}"
        x /= base
    raise AssertionError("unreachable")


_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_count(n: int | float | None, digits: int = 2, significant: bool = False, unit: str = "") -> str:
    """A count (parameters, MACs, SOPs) with an SI prefix: '646.52k', '239.69M', '1.20G', '512'.

    digits: decimals after the point ('646.52k'), or with significant=True significant digits
    ('647k'). Whole counts under 1000 are written whole. `unit` is appended after the prefix
    ('9.6Mop'). None or a non-finite value gives '-'."""
    if _missing(n):
        return MISSING
    scales = _SI + ((1, ""),)
    i = next((k for k, (div, _) in enumerate(scales) if abs(n) >= div), len(scales) - 1)

    def text(k: int) -> str:
        x = n / scales[k][0]
        if scales[k][0] == 1 and float(x).is_integer():
            return f"{int(x)}"  # counts under 1000 are whole
        return f"{x:.{digits}g}" if significant else f"{x:.{digits}f}"

    out = text(i)
    if abs(float(out)) >= 1000 and i > 0:  # 999,999 rounds to '1000.00k': write '1.00M'
        i -= 1
        out = text(i)
    return out + scales[i][1] + unit


def format_number(x: int | float | None, digits: int = 3) -> str:
    """A measured figure in a table: integers (and whole floats >= 1000) with thousands separators
    ('239,692,032'), other floats to `digits` significant digits ('0.216', '6.29'); '-' if missing."""
    if _missing(x):
        return MISSING
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def format_percent(fraction: float | None, digits: int = 2) -> str:
    """A fraction as a percentage: 0.5273 -> '52.73%'; '-' if missing."""
    return MISSING if _missing(fraction) else f"{100 * fraction:.{digits}f}%"


__all__ = ["DECIMAL", "BINARY", "UNITS", "MISSING", "parse_bytes", "format_bytes", "format_count", "format_number",
           "format_percent"]
