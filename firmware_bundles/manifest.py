"""The release manifest and the payload table: frozen values, validated on construction.

A manifest is the release-signed description of one bundle (schema 1)::

    {"type": "manifest", "schema": 1, "bundle_id": str, "component": str, "version": str,
     "security_version": int, "hardware": [model, ...],
     "target": {"size": int, "sha256": hex},
     "payload": {"kind": "full"|"delta", "base": {"size", "sha256"} | null,
                 "codec": "slotline-chunk-1", "chunks": [{"size", "sha256", "out_size"}, ...]},
     "requires": {component: spec}, "notes": str, "created": unix, "expires": unix}

Rules:

* every size is bounded and every digest is 64 lowercase hex characters; the chunk table's
  ``out_size`` values add up to exactly ``target.size`` (so decoding can never produce more or
  fewer bytes than signed), each chunk is at most ``MAX_CHUNK_SIZE`` bytes and decodes to at most
  ``MAX_CHUNK_OUT`` bytes;
* ``kind == "delta"`` iff ``base`` is present;
* ids, versions, models and component names are printable tokens (they end up in topics, file
  names and logs, never as paths taken from the bundle);
* parsing refuses unknown fields and other schema versions (``SchemaUnsupported``).

    manifest = Manifest.from_signed(envelope.signed)
    manifest.payload.chunks[0].out_size
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from firmware_bundles.errors import FormatInvalid, SchemaUnsupported
from firmware_bundles.keys import is_hex_digest
from firmware_bundles.protocol import MAX_CHUNK_DATA

MANIFEST_SCHEMA = 1
CODEC_ID = "slotline-chunk-1"
MAX_IMAGE_SIZE = 1 << 40  # 1 TiB
MAX_CHUNK_OUT = 16 << 20  # the codec's own cap on one chunk's output
# A chunk is the unit of transfer: every chunk a manifest signs must fit one MQTT chunk frame,
# or a release could be valid yet undeliverable.
MAX_CHUNK_SIZE = MAX_CHUNK_DATA
MAX_CHUNKS = 1 << 20
MAX_HARDWARE = 64
MAX_REQUIRES = 64
MAX_NOTES = 64 * 1024
MAX_TIME = 2**40  # unix seconds: year ~36800, bounds arithmetic on times

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=~-]{0,127}")
_SPEC = re.compile(r"[ -~]{1,128}")  # printable ASCII, e.g. ">=1.2,<2"


def check_token(what: str, value: object) -> str:
    """Return ``value`` if it is a printable token (1-128 chars of ``[A-Za-z0-9._:+=~-]``)."""
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise FormatInvalid(f"{what} {str(value)[:64]!r} is not a token [A-Za-z0-9._:+=~-]")
    return value


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise FormatInvalid(f"{what} must be an integer in {low}..{high}")
    return value


def _check_fields(what: str, doc: object, fields: set[str]) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping) or set(doc) != fields:
        raise FormatInvalid(f"{what} must have exactly the fields {sorted(fields)}")
    return doc


class PayloadKind(enum.Enum):
    """Whether the chunks need a base image."""

    FULL = "full"
    DELTA = "delta"


@dataclass(frozen=True)
class ImageRef:
    """An exact image: its size and SHA-256."""

    size: int
    sha256: str

    def __post_init__(self) -> None:
        _check_int("image size", self.size, 0, MAX_IMAGE_SIZE)
        if not is_hex_digest(self.sha256):
            raise FormatInvalid("image sha256 must be 64 lowercase hex characters")

    def to_json(self) -> dict[str, Any]:
        """``{"sha256", "size"}``."""
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, doc: object) -> ImageRef:
        """Parse ``{"sha256", "size"}``."""
        d = _check_fields("image", doc, {"sha256", "size"})
        return cls(size=d["size"], sha256=d["sha256"])


@dataclass(frozen=True)
class ChunkEntry:
    """One row of the chunk table: stored size and digest, and decoded size."""

    size: int
    sha256: str
    out_size: int

    def __post_init__(self) -> None:
        _check_int("chunk size", self.size, 1, MAX_CHUNK_SIZE)
        _check_int("chunk out_size", self.out_size, 1, MAX_CHUNK_OUT)
        if not is_hex_digest(self.sha256):
            raise FormatInvalid("chunk sha256 must be 64 lowercase hex characters")

    def to_json(self) -> dict[str, Any]:
        """``{"out_size", "sha256", "size"}``."""
        return {"out_size": self.out_size, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, doc: object) -> ChunkEntry:
        """Parse one chunk table row."""
        d = _check_fields("chunk", doc, {"out_size", "sha256", "size"})
        return cls(size=d["size"], sha256=d["sha256"], out_size=d["out_size"])


@dataclass(frozen=True)
class Payload:
    """How to produce the target image: kind, base (deltas), codec and chunk table."""

    kind: PayloadKind
    base: ImageRef | None
    codec: str
    chunks: tuple[ChunkEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.kind, PayloadKind):
            raise FormatInvalid("payload kind must be full or delta")
        if (self.kind is PayloadKind.DELTA) != (self.base is not None):
            raise FormatInvalid("a delta payload names a base; a full payload does not")
        if self.codec != CODEC_ID:
            raise FormatInvalid(f"unknown codec {str(self.codec)[:32]!r}")
        if len(self.chunks) > MAX_CHUNKS:
            raise FormatInvalid(f"more than {MAX_CHUNKS} chunks")

    @property
    def out_size(self) -> int:
        """Bytes the chunks decode to, in total."""
        return sum(c.out_size for c in self.chunks)

    @property
    def stored_size(self) -> int:
        """Bytes of the chunks as stored and transferred."""
        return sum(c.size for c in self.chunks)

    def offsets(self) -> list[int]:
        """Output offset of each chunk (chunk i writes at ``offsets()[i]``)."""
        out, pos = [], 0
        for c in self.chunks:
            out.append(pos)
            pos += c.out_size
        return out

    def to_json(self) -> dict[str, Any]:
        """The payload object as signed."""
        return {
            "base": None if self.base is None else self.base.to_json(),
            "chunks": [c.to_json() for c in self.chunks],
            "codec": self.codec,
            "kind": self.kind.value,
        }

    @classmethod
    def from_json(cls, doc: object) -> Payload:
        """Parse a payload object."""
        d = _check_fields("payload", doc, {"base", "chunks", "codec", "kind"})
        try:
            kind = PayloadKind(d["kind"])
        except ValueError:
            raise FormatInvalid("payload kind must be full or delta") from None
        if not isinstance(d["chunks"], list):
            raise FormatInvalid("payload chunks must be a list")
        if len(d["chunks"]) > MAX_CHUNKS:
            raise FormatInvalid(f"more than {MAX_CHUNKS} chunks")
        base = None if d["base"] is None else ImageRef.from_json(d["base"])
        chunks = tuple(ChunkEntry.from_json(c) for c in d["chunks"])
        return cls(kind=kind, base=base, codec=d["codec"], chunks=chunks)

    def check_produces(self, target: ImageRef) -> None:
        """Raise unless the chunk table decodes to exactly ``target.size`` bytes."""
        if self.out_size != target.size:
            raise FormatInvalid(
                f"chunk table produces {self.out_size} bytes, target is {target.size}"
            )


@dataclass(frozen=True)
class Manifest:
    """A release manifest (the ``signed`` part of a release-signed envelope)."""

    bundle_id: str
    component: str
    version: str
    security_version: int
    hardware: tuple[str, ...]
    target: ImageRef
    payload: Payload
    requires: tuple[tuple[str, str], ...]
    notes: str
    created: int
    expires: int
    schema: int = MANIFEST_SCHEMA

    def __post_init__(self) -> None:
        if self.schema != MANIFEST_SCHEMA:
            raise SchemaUnsupported(f"manifest schema {self.schema!r} is not supported")
        check_token("bundle id", self.bundle_id)
        check_token("component", self.component)
        check_token("version", self.version)
        _check_int("security_version", self.security_version, 0, 2**31 - 1)
        if not 1 <= len(self.hardware) <= MAX_HARDWARE:
            raise FormatInvalid(f"a manifest lists 1..{MAX_HARDWARE} hardware models")
        for model in self.hardware:
            check_token("hardware model", model)
        if len(set(self.hardware)) != len(self.hardware):
            raise FormatInvalid("hardware models repeat")
        if len(self.requires) > MAX_REQUIRES:
            raise FormatInvalid(f"more than {MAX_REQUIRES} requires")
        for component, spec in self.requires:
            check_token("required component", component)
            if not isinstance(spec, str) or _SPEC.fullmatch(spec) is None:
                raise FormatInvalid("a requires spec is 1..128 printable ASCII characters")
        if len({c for c, _ in self.requires}) != len(self.requires):
            raise FormatInvalid("requires names a component twice")
        if not isinstance(self.notes, str) or len(self.notes) > MAX_NOTES:
            raise FormatInvalid(f"notes must be a string of at most {MAX_NOTES} characters")
        _check_int("created", self.created, 0, MAX_TIME)
        _check_int("expires", self.expires, 0, MAX_TIME)
        if self.expires <= self.created:
            raise FormatInvalid("a manifest expires after it is created")
        self.payload.check_produces(self.target)

    @property
    def requires_map(self) -> dict[str, str]:
        """``requires`` as a dict."""
        return dict(self.requires)

    def to_signed(self) -> dict[str, Any]:
        """The ``signed`` document of this manifest."""
        return {
            "type": "manifest",
            "schema": self.schema,
            "bundle_id": self.bundle_id,
            "component": self.component,
            "version": self.version,
            "security_version": self.security_version,
            "hardware": list(self.hardware),
            "target": self.target.to_json(),
            "payload": self.payload.to_json(),
            "requires": dict(self.requires),
            "notes": self.notes,
            "created": self.created,
            "expires": self.expires,
        }

    @classmethod
    def from_signed(cls, doc: Mapping[str, Any]) -> Manifest:
        """Parse and validate a manifest's ``signed`` document.

        Raises:
            SchemaUnsupported: another schema version.
            FormatInvalid: any field missing, unknown or invalid.
        """
        if not isinstance(doc, Mapping) or doc.get("type") != "manifest":
            raise FormatInvalid("not a manifest (type)")
        if doc.get("schema") != MANIFEST_SCHEMA:
            raise SchemaUnsupported(f"manifest schema {doc.get('schema')!r} is not supported")
        d = _check_fields(
            "manifest",
            doc,
            {
                "type", "schema", "bundle_id", "component", "version", "security_version",
                "hardware", "target", "payload", "requires", "notes", "created", "expires",
            },
        )
        if not isinstance(d["hardware"], list) or not isinstance(d["requires"], Mapping):
            raise FormatInvalid("hardware must be a list and requires an object")
        return cls(
            bundle_id=d["bundle_id"],
            component=d["component"],
            version=d["version"],
            security_version=d["security_version"],
            hardware=tuple(d["hardware"]),
            target=ImageRef.from_json(d["target"]),
            payload=Payload.from_json(d["payload"]),
            requires=tuple(sorted(d["requires"].items())),
            notes=d["notes"],
            created=d["created"],
            expires=d["expires"],
            schema=d["schema"],
        )
