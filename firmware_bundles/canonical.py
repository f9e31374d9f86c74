r"""Canonical JSON: the one byte string a signature covers.

Rules (design: "a signature covers exactly one byte string"):

* objects with keys sorted by code point, no whitespace (``,`` and ``:`` only), UTF-8 without
  ``\u`` escapes for printable characters (what ``json.dumps(ensure_ascii=False)`` produces);
* values: objects with string keys, arrays, strings, booleans, null and integers in the signed
  64-bit range. **No floats** (their text form is not unique), no NaN/Infinity;
* parsing refuses duplicate keys (two parsers could pick different ones), floats, NaN, documents
  above ``max_size`` bytes or nested deeper than ``max_depth``;
* ``decode_canonical`` additionally requires the input to be exactly ``encode(parsed)``, so a
  mutated byte can never produce "the same" document.

    data = encode({"b": 1, "a": [True, None]})      # b'{"a":[true,null],"b":1}'
    assert decode_canonical(data) == {"a": [True, None], "b": 1}
"""

from __future__ import annotations

import json
from typing import Any

from firmware_bundles.errors import FormatInvalid

MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
DEFAULT_MAX_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_DEPTH = 32


def _check_value(value: Any, max_depth: int) -> None:
    """Walk ``value`` iteratively and raise ``FormatInvalid`` on anything not canonical-safe."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise FormatInvalid(f"JSON nested deeper than {max_depth}")
        if item is None or isinstance(item, bool | str):
            continue
        if isinstance(item, int):
            if not MIN_INT <= item <= MAX_INT:
                raise FormatInvalid("JSON integer outside the signed 64-bit range")
            continue
        if isinstance(item, float):
            raise FormatInvalid("JSON floats are not allowed in signed documents")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise FormatInvalid("JSON object keys must be strings")
                stack.append((sub, depth + 1))
            continue
        if isinstance(item, list | tuple):
            stack.extend((sub, depth + 1) for sub in item)
            continue
        raise FormatInvalid(f"{type(item).__name__} is not a JSON value")


def encode(value: Any, *, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Return the canonical bytes of ``value``.

    Raises:
        FormatInvalid: ``value`` holds a float, a non-string key, an out-of-range integer, a
            lone surrogate, or is nested deeper than ``max_depth``.
    """
    _check_value(value, max_depth)
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError) as e:
        raise FormatInvalid(f"value cannot be canonically encoded: {e}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatInvalid(f"duplicate JSON key {key[:64]!r}")
        out[key] = value
    return out


def _no_float(text: str) -> Any:
    raise FormatInvalid(f"JSON float {text[:32]!r} is not allowed")


def _no_constant(text: str) -> Any:
    raise FormatInvalid(f"JSON constant {text} is not allowed")


def decode(
    data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH
) -> Any:
    """Parse strict JSON (UTF-8, no floats, no NaN, no duplicate keys, bounded size and depth).

    Raises:
        FormatInvalid: any of the above, or not JSON at all.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatInvalid("JSON input must be bytes")
    if len(data) > max_size:
        raise FormatInvalid(f"JSON document of {len(data)} bytes exceeds {max_size}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatInvalid("JSON document is not UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_constant,
        )
    except FormatInvalid:
        raise
    except RecursionError:
        raise FormatInvalid("JSON nested too deeply") from None
    except ValueError as e:
        raise FormatInvalid(f"not JSON: {str(e)[:120]}") from None
    _check_value(value, max_depth)
    return value


def decode_canonical(
    data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH
) -> Any:
    """Parse ``data`` like ``decode`` and require it to be byte-for-byte canonical.

    Raises:
        FormatInvalid: not strict JSON, or not in canonical form.
    """
    value = decode(data, max_size=max_size, max_depth=max_depth)
    if encode(value, max_depth=max_depth) != bytes(data):
        raise FormatInvalid("JSON document is not in canonical form")
    return value
