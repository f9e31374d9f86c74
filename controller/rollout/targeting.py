"""Pure helpers of rollout creation: version requirements, phase sizing, maintenance windows.

* ``satisfies("2.1.3", ">=2.1,<3")``: versions compare as tuples of integers (non-numeric parts
  compare as strings after numbers); a spec is comma-separated clauses with ``>= > <= < == !=``.
* ``split_phases(ids, [1, 10, 50, 100], key)``: cumulative percentages of the devices outside
  the trial group; every phase with a non-zero percentage gets at least one device while any
  remain, and the order of devices is a stable hash of (key, device id), so a 1 % phase is
  spread over sites and models instead of taking the first ids.
* ``window_open(windows, "Europe/Berlin", now)``: a window is ``{"start": "HH:MM", "end":
  "HH:MM", "days": [0..6]}`` in the site's time zone (Monday = 0), ``end < start`` crosses
  midnight; no windows means always open.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_CLAUSE = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*([A-Za-z0-9][A-Za-z0-9._+-]{0,63})\s*")
_TIME = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a dotted version: numbers numerically, other parts after numbers."""
    parts = re.split(r"[.+-]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def parse_spec(spec: str) -> list[tuple[str, str]]:
    """Split ``">=2.1,<3"`` into ``[(">=", "2.1"), ("<", "3")]``.

    Raises:
        ValueError: a clause that does not parse.
    """
    clauses = []
    for raw in spec.split(","):
        m = _CLAUSE.fullmatch(raw)
        if m is None:
            raise ValueError(f"version requirement {spec!r} does not parse (clause {raw!r})")
        clauses.append((m.group(1), m.group(2)))
    return clauses


def satisfies(version: str | None, spec: str) -> bool:
    """Whether ``version`` meets every clause of ``spec`` (an unknown version meets nothing)."""
    if version is None:
        return False
    have = version_key(version)
    ops = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
    }
    try:
        return all(ops[op](have, version_key(v)) for op, v in parse_spec(spec))
    except TypeError:
        return False


def unmet(versions: Mapping[str, Any], requires: Mapping[str, str]) -> list[str]:
    """The requirements a device with ``versions`` (component -> version) does not meet."""
    out = []
    for component, spec in sorted(requires.items()):
        have = versions.get(component)
        if not satisfies(have if isinstance(have, str) else None, spec):
            out.append(f"{component} {spec} (has {have or 'none'})")
    return out


def _order(key: str, device_id: str) -> bytes:
    return hashlib.sha256(f"{key}\x00{device_id}".encode()).digest()


def split_phases(device_ids: Sequence[str], percents: Sequence[int], key: str) -> list[list[str]]:
    """Assign devices to phases by cumulative percentage (see module docstring).

    Raises:
        ValueError: percentages not non-decreasing within 0..100, or not ending at 100.
    """
    if not percents or percents[-1] != 100:
        raise ValueError("the last phase must reach 100 %")
    if any(not 0 <= p <= 100 for p in percents) or list(percents) != sorted(percents):
        raise ValueError("phase percentages must be non-decreasing within 0..100")
    ordered = sorted(device_ids, key=lambda d: _order(key, d))
    n, out, taken = len(ordered), [], 0
    for pct in percents:
        upto = math.ceil(n * pct / 100)
        if pct > 0 and upto <= taken < n:
            upto = taken + 1
        upto = min(max(upto, taken), n)
        out.append(ordered[taken:upto])
        taken = upto
    return out


def check_windows(windows: Any) -> list[dict[str, Any]]:
    """Validate a list of maintenance windows; returns it normalised.

    Raises:
        ValueError: anything but ``[{"start": "HH:MM", "end": "HH:MM", "days": [0..6]?}]``.
    """
    if not isinstance(windows, list) or len(windows) > 32:
        raise ValueError("windows must be a list of at most 32 windows")
    out = []
    for w in windows:
        if not isinstance(w, dict) or set(w) - {"start", "end", "days"}:
            raise ValueError("a window has keys start, end and optional days")
        start, end = w.get("start"), w.get("end")
        if not (isinstance(start, str) and _TIME.fullmatch(start)):
            raise ValueError("window start must be HH:MM")
        if not (isinstance(end, str) and _TIME.fullmatch(end)):
            raise ValueError("window end must be HH:MM")
        days = w.get("days", list(range(7)))
        if not isinstance(days, list) or any(type(d) is not int or not 0 <= d <= 6 for d in days):
            raise ValueError("window days must be integers 0 (Monday) .. 6")
        out.append({"start": start, "end": end, "days": sorted(set(days))})
    return out


def check_tz(tz: str) -> str:
    """Return ``tz`` if it names an IANA time zone.

    Raises:
        ValueError: otherwise.
    """
    if not isinstance(tz, str) or not re.fullmatch(r"[A-Za-z0-9_+/-]{1,64}", tz) or ".." in tz:
        raise ValueError(f"unknown time zone {tz!r:.80}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {tz!r}") from e
    return tz


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def window_open(windows: Sequence[Mapping[str, Any]], tz: str, now: float) -> bool:
    """Whether ``now`` (UNIX seconds) falls in one of the site's windows, in its time zone."""
    if not windows:
        return True
    local = dt.datetime.fromtimestamp(now, ZoneInfo(tz))
    minute, day = local.hour * 60 + local.minute, local.weekday()
    for w in windows:
        start, end, days = _minutes(w["start"]), _minutes(w["end"]), w["days"]
        if start <= end:
            if day in days and start <= minute < end:
                return True
        elif (day in days and minute >= start) or ((day - 1) % 7 in days and minute < end):
            # Crosses midnight: the part after midnight belongs to the previous day's window.
            return True
    return False
