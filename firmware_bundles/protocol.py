"""The MQTT wire contract: topics, message schemas, the chunk frame, size caps, validation.

This module is the only place that knows what travels on the wire; the agent transport, the
controller gateway, the site relay and the simulator all encode and decode through it. It is pure
(bytes in, values out) and raises ``ProtocolViolation`` subclasses with stable codes; callers
count and drop, never crash (see ``DropCounter``).

Rules:

* Topics: ``slotline/v1/dev/{id}/{channel}`` with channel one of ``Channel``. A device id is
  1-64 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit: no ``+ # / $`` or NUL,
  so an id can never widen an ACL pattern (``%u``) or a subscription filter.
* MQTT v5 only; QoS1 everywhere; ``state`` and ``online`` retained.
* Control messages (``state``, ``events``, ``fetch``, ``online``) are JSON objects carrying
  ``"v": 1`` and are readable with ``mosquitto_sub``. ``cmd`` carries the signed command envelope
  verbatim (``{"signed": ..., "signatures": [...]}``); its checks beyond shape belong to the
  command verifier.
* ``chunk`` messages are binary: a 12-byte header, the bundle id, then the chunk bytes::

      magic "SLCK" | version u8 | status u8 | bundle-id length u16 | index u32 | bundle id | data

* Every inbound message is checked against its channel's cap *before* parsing.

    frame = encode_chunk(ChunkFrame(bundle_id="b1", index=3, status=ChunkStatus.OK, data=b"..."))
    assert decode_chunk(frame).index == 3
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from firmware_bundles.errors import (
    DeviceIdInvalid,
    MessageTooLarge,
    ProtocolViolation,
    SchemaUnsupported,
    TopicInvalid,
)

PROTOCOL_VERSION = 1
TOPIC_PREFIX = "slotline/v1/dev"
DEFAULT_SHARE_GROUP = "slotline"

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BUNDLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=-]{0,127}")


class Channel(enum.Enum):
    """The six per-device topics (design: wire protocol table)."""

    CMD = "cmd"
    STATE = "state"
    EVENTS = "events"
    FETCH = "fetch"
    CHUNK = "chunk"
    ONLINE = "online"


# Who may publish on a channel: the device itself, or the server side (controller, relay).
DEVICE_PUBLISHES = frozenset({Channel.STATE, Channel.EVENTS, Channel.FETCH, Channel.ONLINE})
SERVER_PUBLISHES = frozenset({Channel.CMD, Channel.CHUNK})
RETAINED = frozenset({Channel.STATE, Channel.ONLINE})

MAX_CHUNK_DATA = 4 * 1024 * 1024
CHUNK_HEADER = struct.Struct(">4sBBHI")
CHUNK_MAGIC = b"SLCK"
# Caps per channel, checked before any parsing. A command carries a signed release manifest
# (with its chunk table: ~100 bytes per chunk), so it gets the largest control cap.
MAX_BYTES: dict[Channel, int] = {
    Channel.CMD: 1024 * 1024,
    Channel.STATE: 16 * 1024,
    Channel.EVENTS: 16 * 1024,
    Channel.FETCH: 4 * 1024,
    Channel.ONLINE: 256,
    Channel.CHUNK: CHUNK_HEADER.size + 128 + MAX_CHUNK_DATA,
}
MAX_FETCH_INDICES = 64
MAX_REQUEST_ID = 64


# A site relay's identity on the central broker is ``relay-<site>``: the controller serves it what
# that site's devices were offered, and enrollment refuses device ids with this prefix.
RELAY_PREFIX = "relay-"


def relay_id(site: str) -> str:
    """The identity of ``site``'s relay (client id and certificate CN)."""
    return f"{RELAY_PREFIX}{site}"


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe in topics and ACL patterns.

    Raises:
        DeviceIdInvalid: characters outside ``[A-Za-z0-9._-]``, a bad first character, or
            longer than 64 characters.
    """
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise DeviceIdInvalid(f"device id {device_id!r} is not [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")
    return device_id


def valid_device_id(device_id: str) -> bool:
    """Whether ``device_id`` passes ``check_device_id``."""
    return isinstance(device_id, str) and _DEVICE_ID.fullmatch(device_id) is not None


def check_bundle_id(bundle_id: str) -> str:
    """Return ``bundle_id`` if it is a printable token of at most 128 characters."""
    if not isinstance(bundle_id, str) or _BUNDLE_ID.fullmatch(bundle_id) is None:
        raise ProtocolViolation(f"bundle id {bundle_id!r} is not a valid token")
    return bundle_id


def device_topic(device_id: str, channel: Channel) -> str:
    """The topic of one channel of one device."""
    return f"{TOPIC_PREFIX}/{check_device_id(device_id)}/{channel.value}"


def device_filter(channel: Channel) -> str:
    """A filter matching one channel of every device (server side)."""
    return f"{TOPIC_PREFIX}/+/{channel.value}"


def shared_filter(channel: Channel, group: str = DEFAULT_SHARE_GROUP) -> str:
    """A shared-subscription filter: controller replicas in ``group`` split the load."""
    return f"$share/{group}/{device_filter(channel)}"


def parse_topic(topic: str) -> tuple[str, Channel]:
    """Split a device topic into ``(device_id, channel)``.

    Raises:
        TopicInvalid: not ``slotline/v1/dev/<valid id>/<channel>``.
    """
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != TOPIC_PREFIX:
        raise TopicInvalid(f"topic {topic[:200]!r} is not under {TOPIC_PREFIX}/<id>/<channel>")
    if not valid_device_id(parts[3]):
        raise TopicInvalid(f"topic {topic[:200]!r} has an invalid device id")
    try:
        channel = Channel(parts[4])
    except ValueError:
        raise TopicInvalid(f"topic {topic[:200]!r} has an unknown channel") from None
    return parts[3], channel


def check_size(channel: Channel, payload: bytes) -> None:
    """Raise ``MessageTooLarge`` if ``payload`` exceeds the channel's cap."""
    if len(payload) > MAX_BYTES[channel]:
        raise MessageTooLarge(
            f"{channel.value} message of {len(payload)} bytes exceeds {MAX_BYTES[channel]}"
        )


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _loads_object(channel: Channel, payload: bytes) -> dict[str, Any]:
    check_size(channel, payload)
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolViolation(f"{channel.value} message is not JSON") from None
    if not isinstance(doc, dict):
        raise ProtocolViolation(f"{channel.value} message is not a JSON object")
    return doc


def _check_version(channel: Channel, doc: dict[str, Any]) -> None:
    version = doc.get("v")
    if type(version) is not int:
        raise ProtocolViolation(f"{channel.value} message has no integer 'v'")
    if version != PROTOCOL_VERSION:
        raise SchemaUnsupported(f"{channel.value} message version {version} is not supported")


# ---------------------------------------------------------------------------------- state/events


def _check_document(channel: Channel, doc: dict[str, Any]) -> None:
    # One check for both ends: a sender that passes it is never dropped by a receiver (the
    # decoder alone once refused every agent's committed result, which says "code": null).
    if channel is Channel.EVENTS:
        if not isinstance(doc.get("type"), str):
            raise ProtocolViolation("event has no string 'type'")
        code = doc.get("code")
        if code is not None and not isinstance(code, str):
            raise ProtocolViolation("event 'code' is not a string or null")


def encode_document(channel: Channel, doc: dict[str, Any]) -> bytes:
    """Encode a ``state`` or ``events`` document (adds ``"v"``), check its schema and cap.

    Raises:
        ProtocolViolation: what ``decode_document`` would refuse (sender bugs fail here, loudly,
            instead of as silent drops at the receiver).
    """
    if channel not in (Channel.STATE, Channel.EVENTS):
        raise ValueError(f"{channel} does not carry documents")
    _check_document(channel, doc)
    payload = _dumps({**doc, "v": PROTOCOL_VERSION})
    check_size(channel, payload)
    return payload


def decode_document(channel: Channel, payload: bytes) -> dict[str, Any]:
    """Decode and validate a ``state`` or ``events`` document.

    ``events`` must carry a string ``type``; ``code`` when present is a string, or null for
    "no error" (what an agent sends with a successful result).
    """
    doc = _loads_object(channel, payload)
    _check_version(channel, doc)
    _check_document(channel, doc)
    return doc


# ---------------------------------------------------------------------------------- online


def encode_online(online: bool) -> bytes:
    """The retained presence document (``online: false`` is the last will)."""
    return _dumps({"online": online, "v": PROTOCOL_VERSION})


def decode_online(payload: bytes) -> bool:
    """Decode a presence document. An empty payload (retained message cleared) means offline."""
    if payload == b"":
        return False
    doc = _loads_object(Channel.ONLINE, payload)
    _check_version(Channel.ONLINE, doc)
    if type(doc.get("online")) is not bool:
        raise ProtocolViolation("online message has no boolean 'online'")
    return bool(doc["online"])


# ---------------------------------------------------------------------------------- fetch


class FetchOp(enum.Enum):
    """What a ``fetch`` message asks of the server."""

    CHUNKS = "chunks"
    PING = "ping"


@dataclass(frozen=True)
class FetchRequest:
    """A device asks for chunks of one bundle (or pings the server: ``reachable``)."""

    op: FetchOp
    request_id: str
    bundle_id: str = ""
    indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.request_id or len(self.request_id) > MAX_REQUEST_ID:
            raise ProtocolViolation("fetch request id missing or too long")
        if self.op is FetchOp.CHUNKS:
            check_bundle_id(self.bundle_id)
            if not 0 < len(self.indices) <= MAX_FETCH_INDICES:
                raise ProtocolViolation(f"fetch asks for 1..{MAX_FETCH_INDICES} indices")
            if any(type(i) is not int or not 0 <= i < 2**32 for i in self.indices):
                raise ProtocolViolation("fetch index is not an integer in 0..2^32")


def encode_fetch(request: FetchRequest) -> bytes:
    """Encode a fetch request as JSON."""
    doc: dict[str, Any] = {"op": request.op.value, "req": request.request_id}
    if request.op is FetchOp.CHUNKS:
        doc["bundle"] = request.bundle_id
        doc["indices"] = list(request.indices)
    return _dumps({**doc, "v": PROTOCOL_VERSION})


def decode_fetch(payload: bytes) -> FetchRequest:
    """Decode and validate a fetch request."""
    doc = _loads_object(Channel.FETCH, payload)
    _check_version(Channel.FETCH, doc)
    try:
        op = FetchOp(doc.get("op"))
    except ValueError:
        raise ProtocolViolation("fetch has an unknown 'op'") from None
    request_id = doc.get("req")
    if not isinstance(request_id, str):
        raise ProtocolViolation("fetch has no string 'req'")
    if op is FetchOp.PING:
        return FetchRequest(op=op, request_id=request_id)
    bundle_id, indices = doc.get("bundle"), doc.get("indices")
    if not isinstance(bundle_id, str) or not isinstance(indices, list):
        raise ProtocolViolation("fetch has no 'bundle' string and 'indices' list")
    return FetchRequest(op=op, request_id=request_id, bundle_id=bundle_id, indices=tuple(indices))


# ---------------------------------------------------------------------------------- chunk


class ChunkStatus(enum.IntEnum):
    """The status byte of a chunk frame."""

    OK = 0
    NOT_FOUND = 1  # the server does not offer this chunk to this device (no data)
    PONG = 2  # answer to a ping; the bundle id field carries the request id
    REFUSED = 3  # malformed or over-limit request; data is a UTF-8 error code


@dataclass(frozen=True)
class ChunkFrame:
    """One server -> device chunk message."""

    bundle_id: str
    index: int
    status: ChunkStatus = ChunkStatus.OK
    data: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < 2**32:
            raise ProtocolViolation("chunk index out of range")
        if len(self.data) > MAX_CHUNK_DATA:
            raise MessageTooLarge(f"chunk of {len(self.data)} bytes exceeds {MAX_CHUNK_DATA}")
        if len(self.bundle_id.encode()) > 128:
            raise ProtocolViolation("chunk bundle id longer than 128 bytes")


def encode_chunk(frame: ChunkFrame) -> bytes:
    """Encode a chunk frame (header, bundle id, data)."""
    bid = frame.bundle_id.encode()
    header = CHUNK_HEADER.pack(CHUNK_MAGIC, PROTOCOL_VERSION, frame.status, len(bid), frame.index)
    return b"".join((header, bid, frame.data))


def decode_chunk(payload: bytes) -> ChunkFrame:
    """Decode and validate a chunk frame; the data is *not* trusted (the caller checks its digest).

    Raises:
        MessageTooLarge: over the chunk cap.
        SchemaUnsupported: another protocol version.
        ProtocolViolation: bad magic, status, lengths or bundle id.
    """
    check_size(Channel.CHUNK, payload)
    if len(payload) < CHUNK_HEADER.size:
        raise ProtocolViolation("chunk frame shorter than its header")
    magic, version, status, bid_len, index = CHUNK_HEADER.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise ProtocolViolation("chunk frame has a bad magic")
    if version != PROTOCOL_VERSION:
        raise SchemaUnsupported(f"chunk frame version {version} is not supported")
    try:
        status = ChunkStatus(status)
    except ValueError:
        raise ProtocolViolation(f"chunk frame has unknown status {status}") from None
    end = CHUNK_HEADER.size + bid_len
    if bid_len > 128 or end > len(payload):
        raise ProtocolViolation("chunk frame bundle id overruns the frame")
    try:
        bundle_id = payload[CHUNK_HEADER.size : end].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("chunk frame bundle id is not UTF-8") from None
    return ChunkFrame(bundle_id=bundle_id, index=index, status=status, data=payload[end:])


# ---------------------------------------------------------------------------------- cmd


def check_command_shape(payload: bytes) -> dict[str, Any]:
    """Cheap shape check of a signed command envelope before it is queued for verification.

    The signature, device, counter and expiry checks belong to the command verifier; this only
    drops what cannot possibly be a command (too large, not JSON, no ``signed``/``signatures``).
    """
    doc = _loads_object(Channel.CMD, payload)
    if not isinstance(doc.get("signed"), dict) or not isinstance(doc.get("signatures"), list):
        raise ProtocolViolation("command is not a signed envelope")
    return doc


# ---------------------------------------------------------------------------------- counters


@dataclass
class DropCounter:
    """Counts of messages dropped, by stable error code (reported in stats and benchmarks)."""

    counts: Counter[str] = field(default_factory=Counter)

    def drop(self, code: str) -> None:
        """Count one dropped message."""
        self.counts[code] += 1

    @property
    def total(self) -> int:
        """All drops so far."""
        return sum(self.counts.values())
