"""Canonical JSON: stable bytes, strict parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bundles import canonical
from firmware_bundles.errors import FormatInvalid

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=canonical.MIN_INT, max_value=canonical.MAX_INT)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=300)
def test_canonical_encoding_is_stable(value):
    data = canonical.encode(value)
    assert canonical.decode_canonical(data) == value
    assert canonical.encode(canonical.decode(data)) == data


@given(st.dictionaries(st.text(max_size=6), st.integers(-5, 5), min_size=2, max_size=8))
def test_key_order_does_not_change_the_bytes(doc):
    reversed_doc = dict(reversed(list(doc.items())))
    assert canonical.encode(doc) == canonical.encode(reversed_doc)


@given(json_values)
@settings(max_examples=100)
def test_pretty_printed_json_is_not_canonical(value):
    pretty = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=True).encode()
    if pretty != canonical.encode(value):
        with pytest.raises(FormatInvalid):
            canonical.decode_canonical(pretty)


def test_encoding_is_compact_sorted_utf8():
    assert canonical.encode({"b": 1, "a": ["é", None, True]}) == '{"a":["é",null,true],"b":1}'.encode()


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1.5}',
        b'{"a":1e3}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":1,"a":2}',
        b'{"a":18446744073709551616}',
        b"\xff\xfe",
        b'{"a":',
        b"[" * 40 + b"]" * 40,
    ],
    ids=["float", "exponent", "nan", "infinity", "duplicate", "huge-int", "not-utf8", "cut", "deep"],
)
def test_strict_parser_refuses(data):
    with pytest.raises(FormatInvalid):
        canonical.decode(data)


def test_size_cap_is_checked_before_parsing():
    with pytest.raises(FormatInvalid, match="exceeds"):
        canonical.decode(b'"' + b"a" * 100 + b'"', max_size=50)


def test_very_deep_nesting_does_not_crash():
    with pytest.raises(FormatInvalid):
        canonical.decode(b"[" * 100_000 + b"]" * 100_000, max_size=1 << 20)


@pytest.mark.parametrize("value", [1.0, float("nan"), {1: 2}, b"x", 2**64, "\ud800"])
def test_encoder_refuses_what_has_no_canonical_form(value):
    with pytest.raises(FormatInvalid):
        canonical.encode(value)


def test_escaped_form_of_a_plain_character_is_not_canonical():
    assert canonical.decode(b'"\\u0041"') == "A"
    with pytest.raises(FormatInvalid, match="canonical"):
        canonical.decode_canonical(b'"\\u0041"')
