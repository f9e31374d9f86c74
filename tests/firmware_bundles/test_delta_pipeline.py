"""Pipelined decode (``delta.decode_chunks``): in order, bounded, and refusals keep their place.

A corrupt chunk in the middle of a run is refused with its stable code after exactly the
chunks before it were handed out, nothing after it is, and no decoding thread outlives the
iterator (on error, on exhaustion, and when the consumer stops early).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bundles.bundle import apply_chunks, open_bundle
from firmware_bundles.codec.chunk import Tag, decode_cost
from firmware_bundles.codec.streams import (
    StreamOptions,
    decode_stream,
    encode_stream,
    get_uvarint,
)
from firmware_bundles.delta import (
    BytesBaseReader,
    EncodedChunk,
    decode_chunk,
    decode_chunks,
    encode_delta,
)
from firmware_bundles.errors import BundleRejected, DeltaCorrupt, TransferError
from firmware_bundles.manifest import ImageRef

NOW = 1_800_000_000
CHUNK = 16384


def _code_like(rng: random.Random, size: int) -> bytes:
    words = [rng.randbytes(rng.choice((2, 4, 8))) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def _pair(seed: int = 3, size: int = 200_000) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    old = _code_like(rng, size)
    new = bytearray(old[7:] + old[:7])
    for _ in range(40):
        at = rng.randrange(len(new) - 8)
        new[at:at + 4] = rng.randbytes(4)
    return old, bytes(new)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, list[EncodedChunk]]:
    tmp = tmp_path_factory.mktemp("pipeline")
    old, new = _pair()
    (tmp / "old").write_bytes(old)
    (tmp / "new").write_bytes(new)
    chunks = list(encode_delta(tmp / "old", tmp / "new", chunk_out_size=CHUNK))
    assert len(chunks) >= 10
    assert sum(c.data[0] == Tag.PATCH for c in chunks) >= 5
    return old, new, chunks


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("delta-pipeline")]


def _corrupt(c: EncodedChunk) -> bytes:
    """The same delta chunk with one literal too many: well framed, its streams decode on the
    pool, and the apply refuses it (``DeltaCorrupt``)."""
    assert c.data[0] == Tag.PATCH
    view = memoryview(c.data)
    pos = 1
    for _ in range(3):
        _n, pos = get_uvarint(view, pos)
    raws = []
    for _ in range(6):
        raw, pos = decode_stream(view, pos, 1 << 24)
        raws.append(raw)
    raws[5] += b"!"
    opts = StreamOptions(lzma_lclppb=())
    return bytes(view[:_header_end(view)]) + b"".join(encode_stream(r, opts) for r in raws)


def _header_end(view: memoryview) -> int:
    pos = 1
    for _ in range(3):
        _n, pos = get_uvarint(view, pos)
    return pos


@pytest.mark.parametrize("budget", [1, 100_000, 1 << 20, 64 << 20])
def test_outputs_equal_the_serial_decoder_in_order(encoded, budget: int) -> None:
    old, new, chunks = encoded
    base = BytesBaseReader(old)
    outs = list(decode_chunks(((c.data, c.out_size) for c in chunks), base, budget=budget))
    assert [len(o) for o in outs] == [c.out_size for c in chunks]
    assert b"".join(outs) == new
    assert _pipeline_threads() == []


def test_corrupt_chunk_mid_pipeline_is_refused_and_nothing_after_it_is_written(encoded) -> None:
    old, new, chunks = encoded
    bad_at = 5
    assert chunks[bad_at].data[0] == Tag.PATCH
    pairs = [(c.data, c.out_size) for c in chunks]
    pairs[bad_at] = (_corrupt(chunks[bad_at]), chunks[bad_at].out_size)
    with pytest.raises(DeltaCorrupt) as serial:
        list(decode_chunk(*pairs[bad_at], BytesBaseReader(old)))
    written = bytearray()
    with pytest.raises(DeltaCorrupt) as exc:
        for out in decode_chunks(iter(pairs), BytesBaseReader(old), budget=64 << 20):
            written += out
    assert exc.value.code == serial.value.code == "bundle.delta_corrupt"
    assert bytes(written) == new[: sum(c.out_size for c in chunks[:bad_at])]
    assert _pipeline_threads() == []


def test_chunk_with_bad_headers_is_refused_at_its_own_place(encoded) -> None:
    old, new, chunks = encoded
    pairs = [(c.data, c.out_size) for c in chunks]
    pairs[3] = (b"\x7f" + pairs[3][0][1:], pairs[3][1])  # unknown tag: refused when planned
    written = bytearray()
    with pytest.raises(DeltaCorrupt) as exc:
        for out in decode_chunks(iter(pairs), BytesBaseReader(old), budget=64 << 20):
            written += out
    assert exc.value.code == "bundle.delta_corrupt"
    assert bytes(written) == new[: 3 * CHUNK]
    assert _pipeline_threads() == []


def test_input_error_is_raised_after_the_chunks_before_it(encoded) -> None:
    old, new, chunks = encoded

    def source() -> Iterator[tuple[bytes, int]]:
        for c in chunks[:4]:
            yield c.data, c.out_size
        raise TransferError("link lost")

    got = []
    with pytest.raises(TransferError, match="link lost"):
        got.extend(decode_chunks(source(), BytesBaseReader(old), budget=64 << 20))
    assert b"".join(got) == new[: 4 * CHUNK]
    assert _pipeline_threads() == []


def test_consumer_stopping_early_ends_the_threads(encoded) -> None:
    old, _, chunks = encoded
    it = decode_chunks(((c.data, c.out_size) for c in chunks), BytesBaseReader(old))
    next(it)
    assert _pipeline_threads()
    it.close()  # type: ignore[attr-defined]
    assert _pipeline_threads() == []


def test_chunks_in_flight_stay_within_the_budget(encoded) -> None:
    old, _, chunks = encoded
    costs = [decode_cost(c.data, c.out_size) for c in chunks]
    budget = 2 * max(costs)  # two chunks at most, however small the rest
    pulled = 0

    def source() -> Iterator[tuple[bytes, int]]:
        nonlocal pulled
        for c in chunks:
            pulled += 1
            yield c.data, c.out_size

    for done, _out in enumerate(decode_chunks(source(), BytesBaseReader(old), budget=budget)):
        # Pulled but not yet handed out: the chunks charged, plus one read and held back.
        in_flight = range(done, pulled - 1)
        assert sum(costs[i] for i in in_flight) <= budget
    assert pulled == len(chunks)


def test_decode_cost_bounds_every_chunk(encoded) -> None:
    _, _, chunks = encoded
    for c in chunks:
        assert decode_cost(c.data, c.out_size) >= len(c.data) + c.out_size
    assert decode_cost(b"", 100) >= 100  # unparsable: charged, refused later in order


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_flipped_bit_fails_the_same_way_pipelined_and_serial(encoded, data: st.DataObject) -> None:
    old, _, chunks = encoded
    k = data.draw(st.integers(0, len(chunks) - 1))
    bad = bytearray(chunks[k].data)
    bad[data.draw(st.integers(0, len(bad) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    pairs = [(c.data, c.out_size) for c in chunks]
    pairs[k] = (bytes(bad), chunks[k].out_size)
    serial: list[bytes] = []
    serial_code = None
    try:
        for d, o in pairs:
            serial.append(b"".join(decode_chunk(d, o, BytesBaseReader(old))))
    except BundleRejected as e:
        serial_code = e.code
    piped: list[bytes] = []
    piped_code = None
    try:
        piped.extend(decode_chunks(iter(pairs), BytesBaseReader(old), budget=64 << 20))
    except BundleRejected as e:
        piped_code = e.code
    assert piped_code == serial_code
    assert piped == serial
    assert _pipeline_threads() == []


def test_bundle_apply_writes_nothing_of_or_after_a_signed_corrupt_chunk(kit, encoded) -> None:
    # The signer is at fault (digests match), so the refusal comes from the pipelined decode.
    old, new, chunks = encoded
    (kit.tmp / "base.img").write_bytes(old)
    data = [c.data for c in chunks]
    data[6] = _corrupt(chunks[6])
    slb = kit.craft("mid.slb", data, [c.out_size for c in chunks],
                    target=ImageRef(len(new), "ab" * 32))
    written = bytearray()
    with open_bundle(slb, kit.trust, now=NOW) as bundle, pytest.raises(DeltaCorrupt) as exc:
        apply_chunks(bundle.release, bundle.chunks(), BytesBaseReader(old), written.extend)
    assert exc.value.code == "bundle.delta_corrupt"
    assert bytes(written) == new[: 6 * CHUNK]
    assert _pipeline_threads() == []


def test_workers_zero_is_the_serial_decoder(encoded, tmp_path: Path) -> None:
    old, new, chunks = encoded
    outs = decode_chunks(((c.data, c.out_size) for c in chunks), BytesBaseReader(old), workers=0)
    assert b"".join(outs) == new
