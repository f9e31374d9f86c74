"""Human units in scenario files: durations, byte sizes and link rates.

Rules: a bare integer is the base unit (seconds, bytes, bit/s); a string carries its unit.
Rates are in *bits* per second (as links are sold), sizes in bytes (binary prefixes with ``i``,
decimal without). Floats are accepted only where a fraction makes sense (durations).

    parse_duration("250ms") == 0.25      parse_size("2MiB") == 2097152
    parse_rate("256kbit") == 256000      parse_duration(90) == 90.0
"""

from __future__ import annotations

import re

_NUMBER = r"(?P<n>-?\d+(?:\.\d+)?)\s*(?P<u>[A-Za-z/]*)"

_DURATION_UNITS = {
    "": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0,
}
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_RATE_UNITS = {
    "": 1, "bit": 1, "bps": 1, "bit/s": 1,
    "kbit": 1000, "kbps": 1000, "kbit/s": 1000,
    "mbit": 1000**2, "mbps": 1000**2, "mbit/s": 1000**2,
    "gbit": 1000**3, "gbps": 1000**3, "gbit/s": 1000**3,
}


class UnitError(ValueError):
    """A value that does not parse in the unit its field expects."""


def _split(value: object, what: str) -> tuple[float, str]:
    if isinstance(value, bool):
        raise UnitError(f"expected a {what}, got a boolean")
    if isinstance(value, int | float):
        return float(value), ""
    if not isinstance(value, str):
        raise UnitError(f"expected a {what}, got {type(value).__name__}")
    m = re.fullmatch(_NUMBER, value.strip())
    if m is None:
        raise UnitError(f"{value!r} is not a {what}")
    return float(m["n"]), m["u"]


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``1.5``, ``"250ms"``, ``"2m"``, ``"-2h"`` (negative for clock skew)."""
    n, unit = _split(value, "duration (e.g. 30, '250ms', '2m')")
    factor = _DURATION_UNITS.get(unit)
    if factor is None:
        raise UnitError(f"unknown duration unit {unit!r} (use ms, s, m, h, d)")
    return n * factor


def parse_size(value: object) -> int:
    """Bytes from ``4096``, ``"64KiB"``, ``"2MiB"``, ``"1MB"``."""
    n, unit = _split(value, "size (e.g. 4096, '64KiB', '2MiB')")
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise UnitError(f"unknown size unit {unit!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    if n < 0:
        raise UnitError("a size cannot be negative")
    return int(n * factor)


def parse_rate(value: object) -> int:
    """Bits per second from ``1000000``, ``"256kbit"``, ``"20Mbit"``, ``"1Gbit/s"``."""
    n, unit = _split(value, "rate (e.g. '256kbit', '20Mbit')")
    factor = _RATE_UNITS.get(unit.lower())
    if factor is None:
        raise UnitError(f"unknown rate unit {unit!r} (use bit, kbit, Mbit, Gbit per second)")
    if n <= 0:
        raise UnitError("a rate must be positive")
    return int(n * factor)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` for tables."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - loop always returns
