"""A tiny HTML builder that escapes by default.

Rules: every ``str`` that reaches a page goes through ``html.escape`` (text and attribute values
alike), because device-reported strings (ids, serials, phases, error codes) are hostile input.
Only ``Markup`` passes through unescaped, and ``Markup`` is made only by this module's builders
from escaped parts, never from a caller's string.

    el("td", {"class": "num"}, 42)           # <td class="num">42</td>
    el("a", {"href": "/x?a=1&b=<"}, "<b>")   # <a href="/x?a=1&amp;b=&lt;">&lt;b&gt;</a>
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode

_VOID = frozenset({"meta", "link", "input", "br", "hr", "img"})


class Markup(str):
    """Already-escaped HTML. Made by ``el``/``join``/``raw_const`` only."""

    __slots__ = ()


def text(value: object) -> Markup:
    """``value`` as escaped text (None is empty)."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(str(value), quote=True))


def raw_const(value: str) -> Markup:
    """A constant written in this package's source (doctype, entities); never data."""
    return Markup(value)


def join(children: Iterable[object]) -> Markup:
    """Concatenate children, escaping every plain value; nested iterables are flattened."""
    parts: list[str] = []
    for c in children:
        if isinstance(c, str | int | float) or c is None:
            parts.append(text(c))
        else:
            parts.append(join(c))  # type: ignore[arg-type]
    return Markup("".join(parts))


def el(tag: str, attrs: Mapping[str, object] | None = None, *children: object) -> Markup:
    """One element; attribute values and children are escaped (``True`` -> bare attribute)."""
    out = [f"<{tag}"]
    for k, v in (attrs or {}).items():
        if v is None or v is False:
            continue
        out.append(f" {k}" if v is True else f' {k}="{text(v)}"')
    out.append(">")
    if tag in _VOID:
        return Markup("".join(out))
    out.append(join(children))
    out.append(f"</{tag}>")
    return Markup("".join(out))


def url(path: str, **query: object) -> str:
    """``path`` with the non-empty query parameters, URL-encoded (escaped again by ``el``)."""
    q = {k: str(v) for k, v in query.items() if v not in (None, "")}
    return f"{path}?{urlencode(q)}" if q else path
