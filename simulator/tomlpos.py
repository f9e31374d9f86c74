"""Line numbers for TOML keys, which ``tomllib`` does not give.

``key_lines(text)`` scans the document once and maps each key path to the line that defines it:
``("site", 1, "outage", 0, "at")`` for the ``at`` key of the first ``[[site.outage]]`` under the
second ``[[site]]``. Paths use list indices for arrays of tables and for elements of inline
arrays that start on their own line. It is a locator, not a parser: ``tomllib`` has already
accepted the document, so the scanner only needs to follow headers, keys and bracket depth.

``line_of(lines, path)`` falls back to the nearest enclosing path, so an error about a missing
key points at its table.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_BARE_KEY = re.compile(rf"\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")
_INLINE_KEY = re.compile(r"""[{,]\s*([A-Za-z0-9_-]+|"[^"]*")\s*=""")


def _split_dotted(key: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _strip_comment(line: str) -> str:
    # A '#' outside quotes starts a comment; quotes inside comments do not matter.
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _depth_change(text: str) -> int:
    depth, quote = 0, ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


def key_lines(text: str) -> dict[Path, int]:
    """Map every key path in a TOML document to its 1-based line number."""
    lines: dict[Path, int] = {}
    latest: dict[Path, int] = {}  # array-of-tables path -> index of its last element
    current: Path = ()
    in_multiline: str = ""
    array_path: Path | None = None  # inside a multi-line array value
    array_depth = 0
    array_index = -1
    for lineno, raw in enumerate(text.splitlines(), 1):
        if in_multiline:
            if raw.count(in_multiline) % 2 == 1:
                in_multiline = ""
            continue
        line = _strip_comment(raw)
        stripped = line.strip()
        if array_path is not None:
            # Each '{' or '[' opening at depth 1 starts the next element of the array value.
            depth = array_depth
            for ch in stripped:
                if ch in "[{" and depth == 1:
                    array_index += 1
                    lines[(*array_path, array_index)] = lineno
                depth += _depth_change(ch)
            for im in _INLINE_KEY.finditer(stripped):
                if array_index >= 0:
                    lines.setdefault((*array_path, array_index, im[1].strip('"')), lineno)
            array_depth = depth
            if array_depth <= 0:
                array_path = None
            continue
        if not stripped:
            continue
        if stripped.startswith("["):
            is_array = stripped.startswith("[[")
            name = stripped.strip("[] ").split("]")[0]
            parts = _split_dotted(name)
            path: Path = ()
            for i, part in enumerate(parts):
                path = (*path, part)
                last = i == len(parts) - 1
                if last and is_array:
                    idx = latest.get(path, -1) + 1
                    latest[path] = idx
                    lines.setdefault(path, lineno)
                    path = (*path, idx)
                elif path in latest:
                    path = (*path, latest[path])
            lines[path] = lineno
            current = path
            continue
        m = _BARE_KEY.match(line)
        if m is None:
            continue
        key_path: Path = (*current, *_split_dotted(m[1]))
        lines[key_path] = lineno
        value = line[m.end():].strip()
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                in_multiline = quote
        if value.startswith("{"):
            for km in _INLINE_KEY.finditer(value):
                lines[(*key_path, km[1].strip('"'))] = lineno
        elif value.startswith("["):
            depth = 0
            index = -1
            for ch in value:
                if ch in "[{" and depth == 1:
                    index += 1
                    lines[(*key_path, index)] = lineno
                depth += _depth_change(ch)
            if depth > 0:
                array_path, array_depth, array_index = key_path, depth, index
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of ``path`` or of its nearest enclosing key or table."""
    p = tuple(path)
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return None


def format_path(path: Path) -> str:
    """``("site", 1, "outage", 0, "at")`` -> ``site[1].outage[0].at``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
