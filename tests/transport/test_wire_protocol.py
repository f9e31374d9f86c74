"""The wire contract: topics, ids, documents, fetch requests, chunk frames, caps."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bundles import protocol as wire
from firmware_bundles.errors import (
    DeviceIdInvalid,
    MessageTooLarge,
    ProtocolViolation,
    SchemaUnsupported,
    TopicInvalid,
)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$SYS", "a\x00b", "-lead", "x" * 65, "é"])
def test_ids_that_could_widen_an_acl_are_refused(bad: str) -> None:
    with pytest.raises(DeviceIdInvalid):
        wire.check_device_id(bad)
    with pytest.raises(DeviceIdInvalid):
        wire.device_topic(bad, wire.Channel.CMD)


def test_topics_round_trip() -> None:
    for ch in wire.Channel:
        assert wire.parse_topic(wire.device_topic("gw-0042", ch)) == ("gw-0042", ch)
    assert wire.shared_filter(wire.Channel.STATE) == "$share/slotline/slotline/v1/dev/+/state"


@pytest.mark.parametrize(
    "topic",
    [
        "slotline/v1/dev/a/nope",
        "slotline/v2/dev/a/cmd",
        "slotline/v1/dev/a/b/cmd",
        "x",
        "slotline/v1/dev/$x/cmd",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicInvalid):
        wire.parse_topic(topic)


def test_chunk_frame_round_trip_and_refusals() -> None:
    frame = wire.ChunkFrame("bundle-1", 7, wire.ChunkStatus.OK, b"\x00" * 100)
    assert wire.decode_chunk(wire.encode_chunk(frame)) == frame
    good = wire.encode_chunk(frame)
    with pytest.raises(ProtocolViolation):
        wire.decode_chunk(b"XXXX" + good[4:])
    with pytest.raises(SchemaUnsupported):
        wire.decode_chunk(good[:4] + b"\x02" + good[5:])
    with pytest.raises(ProtocolViolation):
        wire.decode_chunk(good[:5] + b"\x09" + good[6:])  # unknown status
    with pytest.raises(ProtocolViolation):
        wire.decode_chunk(good[:12])  # bundle id overruns
    with pytest.raises(MessageTooLarge):
        wire.decode_chunk(good + bytes(wire.MAX_BYTES[wire.Channel.CHUNK]))


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_violation(data: bytes) -> None:
    for decode in (wire.decode_chunk, wire.decode_fetch, wire.decode_online):
        with contextlib.suppress(ProtocolViolation, SchemaUnsupported):
            decode(data)
    for ch in (wire.Channel.STATE, wire.Channel.EVENTS):
        with contextlib.suppress(ProtocolViolation, SchemaUnsupported):
            wire.decode_document(ch, data)


def test_fetch_round_trip_and_limits() -> None:
    req = wire.FetchRequest(wire.FetchOp.CHUNKS, "r1", "b1", (0, 5, 9))
    assert wire.decode_fetch(wire.encode_fetch(req)) == req
    ping = wire.FetchRequest(wire.FetchOp.PING, "p1")
    assert wire.decode_fetch(wire.encode_fetch(ping)) == ping
    with pytest.raises(ProtocolViolation):
        wire.FetchRequest(wire.FetchOp.CHUNKS, "r", "b1", tuple(range(wire.MAX_FETCH_INDICES + 1)))
    with pytest.raises(ProtocolViolation):
        wire.decode_fetch(b'{"v":1,"op":"chunks","req":"r","bundle":"b1","indices":[true]}')
    with pytest.raises(ProtocolViolation):
        wire.decode_fetch(b'{"v":1,"op":"chunks","req":"r","bundle":"b1","indices":[1.5]}')


def test_documents_carry_the_version_and_events_a_type() -> None:
    doc = wire.decode_document(
        wire.Channel.EVENTS, wire.encode_document(wire.Channel.EVENTS, {"type": "x", "code": "c"})
    )
    assert doc == {"type": "x", "code": "c", "v": 1}
    with pytest.raises(ProtocolViolation):
        wire.decode_document(wire.Channel.EVENTS, b'{"v":1,"type":1}')
    with pytest.raises(SchemaUnsupported):
        wire.decode_document(wire.Channel.STATE, b'{"v":2}')
    with pytest.raises(MessageTooLarge):
        wire.encode_document(wire.Channel.STATE, {"x": "y" * 20000})
    assert wire.decode_online(wire.encode_online(online=True)) is True
    assert wire.decode_online(b"") is False


def test_committed_result_with_null_code_reaches_the_controller() -> None:
    """Every agent reports a success as ``"code": null``; the gateway dropped each one as
    ``protocol.malformed``, so no committed result ever reached the controller."""
    doc = {"type": "result", "outcome": "committed", "code": None, "message": ""}
    events = wire.Channel.EVENTS
    assert wire.decode_document(events, wire.encode_document(events, doc))["code"] is None
    for bad in (1, True, [], {}):
        with pytest.raises(ProtocolViolation):
            wire.decode_document(
                events, b'{"v":1,"type":"result","code":%s}' % json.dumps(bad).encode()
            )


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(
    st.dictionaries(
        st.sampled_from(["type", "code", "message", "outcome"]) | st.text(max_size=6),
        _JSON_VALUES,
        max_size=5,
    )
)
def test_what_a_sender_can_encode_every_receiver_accepts(doc: dict[str, object]) -> None:
    """Senders and receivers share one schema check: nothing encoded is dropped on arrival."""
    for ch in (wire.Channel.STATE, wire.Channel.EVENTS):
        try:
            payload = wire.encode_document(ch, doc)
        except ProtocolViolation:
            continue
        wire.decode_document(ch, payload)


def test_command_shape_check() -> None:
    assert wire.check_command_shape(b'{"signed":{},"signatures":[]}')
    for bad in (b"[]", b'{"signed":1,"signatures":[]}', b"\xff"):
        with pytest.raises(ProtocolViolation):
            wire.check_command_shape(bad)


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=128),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=512),
)
def test_the_chunk_servers_fast_framing_sends_the_same_bytes(
    bundle_id: str, index: int, data: bytes
) -> None:
    # The chunk server frames OK chunks without building a ChunkFrame per chunk; a device
    # must not be able to tell.
    from agent.transport.serving import _chunk_frame  # noqa: PLC0415 - the one private under test

    frame = wire.ChunkFrame(bundle_id, index, data=data)
    assert _chunk_frame(bundle_id, index, data) == wire.encode_chunk(frame)
    assert wire.decode_chunk(_chunk_frame(bundle_id, index, data)) == frame
