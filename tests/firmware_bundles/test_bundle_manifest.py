"""Manifest values: every field validated, unknown fields and schemas refused."""

from __future__ import annotations

import dataclasses

import pytest

from firmware_bundles.errors import FormatInvalid, SchemaUnsupported
from firmware_bundles.manifest import (
    CODEC_ID,
    MAX_CHUNK_OUT,
    MAX_CHUNK_SIZE,
    ChunkEntry,
    ImageRef,
    Manifest,
    Payload,
    PayloadKind,
)

H = "ab" * 32


def _manifest(**fields) -> Manifest:
    payload = Payload(PayloadKind.FULL, None, CODEC_ID, (ChunkEntry(10, H, 100), ChunkEntry(5, H, 50)))
    values = {
        "bundle_id": "rootfs-1", "component": "rootfs", "version": "1.2.3",
        "security_version": 3, "hardware": ("board-a", "board-b"), "target": ImageRef(150, H),
        "payload": payload, "requires": (("bootloader", ">=2"),), "notes": "n",
        "created": 100, "expires": 200,
    }
    values.update(fields)
    return Manifest(**values)


def test_round_trip_through_the_signed_document():
    m = _manifest()
    assert Manifest.from_signed(m.to_signed()) == m
    assert m.payload.offsets() == [0, 100]
    assert m.requires_map == {"bootloader": ">=2"}


@pytest.mark.parametrize(
    "fields",
    [
        {"bundle_id": "../etc/passwd"},
        {"bundle_id": ""},
        {"component": "a b"},
        {"version": "1" * 200},
        {"security_version": -1},
        {"security_version": 1.0},
        {"hardware": ()},
        {"hardware": ("a", "a")},
        {"hardware": ("x/y",)},
        {"requires": (("a", ""),)},
        {"requires": (("a", "1"), ("a", "2"))},
        {"notes": "x" * 70_000},
        {"expires": 100},
        {"created": -1},
        {"target": ImageRef(151, H)},
    ],
    ids=lambda f: next(iter(f)),
)
def test_invalid_manifest_fields_are_refused(fields):
    with pytest.raises(FormatInvalid):
        _manifest(**fields)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ImageRef(-1, H),
        lambda: ImageRef(1 << 41, H),
        lambda: ImageRef(1, H.upper()),
        lambda: ImageRef(1, H[:-1]),
        lambda: ChunkEntry(0, H, 1),
        lambda: ChunkEntry(MAX_CHUNK_SIZE + 1, H, 1),
        lambda: ChunkEntry(1, H, MAX_CHUNK_OUT + 1),
        lambda: ChunkEntry(1, H, 0),
        lambda: Payload(PayloadKind.DELTA, None, CODEC_ID, ()),
        lambda: Payload(PayloadKind.FULL, ImageRef(1, H), CODEC_ID, ()),
        lambda: Payload(PayloadKind.FULL, None, "zstd-99", ()),
    ],
    ids=["neg-size", "huge-size", "upper-hex", "short-hex", "empty-chunk", "chunk-too-big",
         "out-too-big", "zero-out", "delta-no-base", "full-with-base", "unknown-codec"],
)
def test_invalid_values_are_refused(make):
    with pytest.raises(FormatInvalid):
        make()


def test_unknown_field_is_refused():
    doc = _manifest().to_signed()
    doc["install_script"] = "rm -rf /"
    with pytest.raises(FormatInvalid, match="exactly the fields"):
        Manifest.from_signed(doc)


def test_missing_field_is_refused():
    doc = _manifest().to_signed()
    del doc["expires"]
    with pytest.raises(FormatInvalid):
        Manifest.from_signed(doc)


def test_other_schema_is_unsupported():
    doc = _manifest().to_signed()
    doc["schema"] = 2
    with pytest.raises(SchemaUnsupported):
        Manifest.from_signed(doc)


def test_other_document_type_is_not_a_manifest():
    doc = _manifest().to_signed()
    doc["type"] = "command"
    with pytest.raises(FormatInvalid, match="type"):
        Manifest.from_signed(doc)


def test_values_are_frozen():
    m = _manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.version = "6.6.6"  # type: ignore[misc]
