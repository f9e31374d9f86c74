"""Round trips and refusals of the delta codec (firmware_bundles/delta.py)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bundles.codec import chunk as chunk_mod
from firmware_bundles.codec.chunk import Tag
from firmware_bundles.codec.encoder import prefix_chunk
from firmware_bundles.codec.matcher import Covers
from firmware_bundles.codec.streams import (
    Codec,
    StreamOptions,
    decode_all,
    decode_stream,
    encode_stream,
    get_uvarint,
    parse_stream,
    put_uvarint,
)
from firmware_bundles.delta import (
    BytesBaseReader,
    EncodedChunk,
    FileBaseReader,
    decode_chunk,
    encode_delta,
    encode_full,
)
from firmware_bundles.errors import BundleRejected, DeltaCorrupt, SizeExceeded, Truncated

SMALL_CHUNK = 4096


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _apply(chunks: list[EncodedChunk], base: bytes | None) -> bytes:
    reader = BytesBaseReader(base) if base is not None else None
    out = bytearray()
    for c in chunks:
        pieces = list(decode_chunk(c.data, c.out_size, reader))
        assert sum(len(p) for p in pieces) == c.out_size
        out += b"".join(pieces)
    return bytes(out)


def _roundtrip(tmp: Path, old: bytes, new: bytes, chunk: int = SMALL_CHUNK) -> list[EncodedChunk]:
    o = _write(tmp, "old", old)
    n = _write(tmp, "new", new)
    chunks = list(encode_delta(o, n, chunk_out_size=chunk))
    assert [c.out_size for c in chunks] == [min(chunk, len(new) - i)
                                            for i in range(0, len(new), chunk)]
    assert _apply(chunks, old) == new
    full = list(encode_full(n, chunk_out_size=chunk))
    assert _apply(full, None) == new
    return chunks


def _mutate(rng: random.Random, data: bytes, edits: int) -> bytes:
    out = bytearray(data)
    for _ in range(edits):
        kind = rng.randrange(4)
        pos = rng.randrange(len(out) + 1)
        if kind == 0 and out:  # flip bytes (like a changed constant)
            for j in range(pos, min(len(out), pos + rng.randrange(1, 8))):
                out[j] ^= rng.randrange(1, 256)
        elif kind == 1:  # insert (shifts everything after: addresses move)
            out[pos:pos] = rng.randbytes(rng.randrange(1, 300))
        elif kind == 2:  # delete
            del out[pos:pos + rng.randrange(1, 300)]
        else:  # move a block elsewhere (reordered sections)
            size = rng.randrange(1, 2000)
            block = out[pos:pos + size]
            del out[pos:pos + size]
            at = rng.randrange(len(out) + 1)
            out[at:at] = block
    return bytes(out)


def _code_like(rng: random.Random, size: int) -> bytes:
    """Bytes with repetition, like machine code and tables (random bytes do not compress)."""
    words = [rng.randbytes(rng.randrange(2, 12)) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), size=st.integers(0, 30000), edits=st.integers(0, 12))
def test_roundtrip_mutated_images(tmp_path: Path, seed: int, size: int, edits: int) -> None:
    rng = random.Random(seed)
    old = _code_like(rng, size)
    new = _mutate(rng, old, edits)
    _roundtrip(tmp_path, old, new)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.binary(max_size=3000), new=st.binary(max_size=3000),
       chunk=st.sampled_from([1, 7, 512, 4096]))
def test_roundtrip_random_and_tiny_images(tmp_path: Path, old: bytes, new: bytes,
                                          chunk: int) -> None:
    _roundtrip(tmp_path, old, new, chunk)


@pytest.mark.parametrize(("old", "new"), [
    (b"", b""), (b"", b"x"), (b"x", b""), (b"a" * 10000, b"a" * 10000), (b"\0" * 50000, b"\0" * 50001),
])
def test_roundtrip_edge_images(tmp_path: Path, old: bytes, new: bytes) -> None:
    _roundtrip(tmp_path, old, new)


def test_identical_image_is_nearly_free(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(200_000)
    chunks = _roundtrip(tmp_path, data, data, chunk=65536)
    assert all(c.data[0] == Tag.PATCH for c in chunks)
    assert sum(len(c.data) for c in chunks) < 1000


def test_shifted_code_uses_base(tmp_path: Path) -> None:
    rng = random.Random(2)
    old = rng.randbytes(100_000)
    new = b"\x90" * 333 + old[:50_000] + rng.randbytes(100) + old[50_000:]
    chunks = _roundtrip(tmp_path, old, new, chunk=32768)
    assert sum(len(c.data) for c in chunks) < 3000


def test_reordered_blocks(tmp_path: Path) -> None:
    rng = random.Random(3)
    blocks = [rng.randbytes(5000) for _ in range(20)]
    old = b"".join(blocks)
    rng.shuffle(blocks)
    chunks = _roundtrip(tmp_path, old, b"".join(blocks), chunk=16384)
    assert sum(len(c.data) for c in chunks) < 5000


def test_file_base_reader(tmp_path: Path) -> None:
    rng = random.Random(4)
    old = rng.randbytes(70_000)
    new = _mutate(rng, old, 5)
    o = _write(tmp_path, "old", old)
    n = _write(tmp_path, "new", new)
    out = bytearray()
    with FileBaseReader(o) as base:
        assert base.size == len(old)
        for c in encode_delta(o, n, chunk_out_size=8192):
            out += b"".join(decode_chunk(c.data, c.out_size, base))
    assert out == new


def _delta_chunks(tmp_path: Path) -> tuple[bytes, bytes, list[EncodedChunk]]:
    rng = random.Random(5)
    old = _code_like(rng, 40_000)
    new = _mutate(rng, old, 6)
    chunks = list(encode_delta(_write(tmp_path, "old", old), _write(tmp_path, "new", new),
                               chunk_out_size=16384))
    assert any(c.data[0] == Tag.PATCH for c in chunks)
    return old, new, chunks


def test_delta_chunk_without_base_is_refused(tmp_path: Path) -> None:
    _, _, chunks = _delta_chunks(tmp_path)
    c = next(c for c in chunks if c.data[0] == Tag.PATCH)
    with pytest.raises(DeltaCorrupt) as e:
        list(decode_chunk(c.data, c.out_size, None))
    assert e.value.code == "bundle.delta_corrupt"


def test_base_too_short_is_refused(tmp_path: Path) -> None:
    old, _, chunks = _delta_chunks(tmp_path)
    short = BytesBaseReader(old[: len(old) // 3])
    with pytest.raises(DeltaCorrupt):
        for c in chunks:
            list(decode_chunk(c.data, c.out_size, short))


def test_wrong_base_same_size_gives_wrong_bytes_not_a_crash(tmp_path: Path) -> None:
    # The bundle layer refuses a wrong base by digest before apply; decode itself stays bounded.
    old, new, chunks = _delta_chunks(tmp_path)
    wrong = BytesBaseReader(bytes(len(old)))
    out = b"".join(b"".join(decode_chunk(c.data, c.out_size, wrong)) for c in chunks)
    assert len(out) == len(new)
    assert out != new


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_chunk_is_refused_with_a_code(tmp_path: Path, data: st.DataObject) -> None:
    old, _, chunks = _delta_chunks(tmp_path)
    c = data.draw(st.sampled_from(chunks))
    cut = data.draw(st.integers(0, len(c.data) - 1))
    with pytest.raises(BundleRejected) as e:
        list(decode_chunk(c.data[:cut], c.out_size, BytesBaseReader(old)))
    assert e.value.code in {"bundle.truncated", "bundle.delta_corrupt", "bundle.size_exceeded"}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_chunk_is_refused_or_stays_bounded(tmp_path: Path, data: st.DataObject) -> None:
    # A flipped bit either fails to decode with a stable code or decodes to exactly out_size
    # bytes (a bit inside a literal or diff byte); the chunk digest catches the latter.
    old, _, chunks = _delta_chunks(tmp_path)
    c = data.draw(st.sampled_from(chunks))
    pos = data.draw(st.integers(0, len(c.data) - 1))
    bad = bytearray(c.data)
    bad[pos] ^= 1 << data.draw(st.integers(0, 7))
    try:
        out = b"".join(decode_chunk(bytes(bad), c.out_size, BytesBaseReader(old)))
    except BundleRejected as e:
        assert e.code in {"bundle.truncated", "bundle.delta_corrupt", "bundle.size_exceeded"}  # noqa: PT017
    else:
        assert len(out) == c.out_size


def test_unknown_tag_and_empty_chunk() -> None:
    with pytest.raises(DeltaCorrupt):
        list(decode_chunk(b"\x7f", 1, None))
    with pytest.raises(Truncated):
        list(decode_chunk(b"", 1, None))


def test_out_size_above_limit_is_refused() -> None:
    with pytest.raises(SizeExceeded):
        list(decode_chunk(bytes((Tag.FULL,)) + encode_stream(b"x"), 1 << 40, None))


def test_decompression_bomb_is_refused() -> None:
    # A stream whose payload inflates far past its declared size stops at the declared size.
    bomb = encode_stream(bytes(1 << 20))
    assert bomb[0] != Codec.RAW
    with pytest.raises(SizeExceeded):
        list(decode_chunk(bytes((Tag.FULL,)) + bomb, 1000, None))
    # Declared small, payload bigger: refused without producing more than declared.
    comp = encode_stream(bytes(1 << 20))
    raw_len_at = 1
    forged = bytearray((comp[0],))
    put_uvarint(forged, 1000)
    rest = comp[raw_len_at:]
    # skip the original raw_len field
    i = 0
    while rest[i] & 0x80:
        i += 1
    forged += rest[i + 1:]
    with pytest.raises(SizeExceeded):
        list(decode_chunk(bytes((Tag.FULL,)) + bytes(forged), 1000, None))


def test_full_chunk_declaring_fewer_bytes_is_truncated() -> None:
    chunk = bytes((Tag.FULL,)) + encode_stream(b"abc")
    with pytest.raises(Truncated):
        list(decode_chunk(chunk, 4, None))
    with pytest.raises(SizeExceeded):
        list(decode_chunk(chunk, 2, None))


@pytest.fixture
def numpy_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the numpy fallback (what runs where the C helper could not be built)."""
    monkeypatch.setattr(chunk_mod, "_native", None)


@pytest.mark.usefixtures("numpy_apply")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), size=st.integers(0, 20000), edits=st.integers(0, 10))
def test_numpy_fallback_roundtrip(tmp_path: Path, seed: int, size: int, edits: int) -> None:
    rng = random.Random(seed)
    old = _code_like(rng, size)
    _roundtrip(tmp_path, old, _mutate(rng, old, edits))


@pytest.mark.usefixtures("numpy_apply")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_numpy_fallback_refuses_corruption(tmp_path: Path, data: st.DataObject) -> None:
    old, _, chunks = _delta_chunks(tmp_path)
    c = data.draw(st.sampled_from(chunks))
    pos = data.draw(st.integers(0, len(c.data) - 1))
    bad = bytearray(c.data)
    bad[pos] ^= 1 << data.draw(st.integers(0, 7))
    try:
        out = b"".join(decode_chunk(bytes(bad), c.out_size, BytesBaseReader(old)))
    except BundleRejected as e:
        assert e.code in {"bundle.truncated", "bundle.delta_corrupt", "bundle.size_exceeded"}  # noqa: PT017
    else:
        assert len(out) == c.out_size


def test_c_and_numpy_agree_on_a_coarse_coded_diff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Dense small changes with regular spacing (like a relocated pointer table).
    rng = random.Random(9)
    old = bytearray(_code_like(rng, 300_000))
    new = bytearray(old)
    for i in range(0, len(new), 8):
        new[i] = (new[i] + 3) % 256
    chunks = _roundtrip(tmp_path, bytes(old), bytes(new), chunk=65536)
    monkeypatch.setattr(chunk_mod, "_native", None)
    assert _apply(chunks, bytes(old)) == bytes(new)


def test_c_helper_is_built() -> None:
    # The install builds it (setup.py); without it apply is slower and needs more memory.
    assert chunk_mod._native is not None


def test_prefix_chunk_roundtrip_and_refusals() -> None:
    rng = random.Random(12)
    old = _code_like(rng, 50_000)
    new = _mutate(rng, old, 40)[:40_000]
    covers = Covers(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    data = prefix_chunk(old, covers, 0, len(new), new)
    assert data[0] == Tag.PREFIX
    assert len(data) < len(new) // 4
    assert b"".join(decode_chunk(data, len(new), BytesBaseReader(old))) == new
    with pytest.raises(DeltaCorrupt):
        list(decode_chunk(data, len(new), None))
    with pytest.raises(DeltaCorrupt):
        list(decode_chunk(data, len(new), BytesBaseReader(old[:1000])))
    with pytest.raises(BundleRejected):
        list(decode_chunk(data[:-3], len(new), BytesBaseReader(old)))
    with pytest.raises(SizeExceeded):
        list(decode_chunk(data, len(new) - 1, BytesBaseReader(old)))
    with pytest.raises(Truncated):
        list(decode_chunk(data, len(new) + 1, BytesBaseReader(old)))


def test_rewritten_image_picks_the_smallest_chunk_kind(tmp_path: Path) -> None:
    # Code rewritten in many small places: covers are short, so the encoder may choose a
    # prefix or full chunk; whatever it picks must round-trip and be no bigger than the others.
    rng = random.Random(13)
    old = _code_like(rng, 60_000)
    new = _mutate(rng, old, 400)
    chunks = _roundtrip(tmp_path, old, new, chunk=16384)
    assert {c.data[0] for c in chunks} <= {Tag.FULL, Tag.PATCH, Tag.PREFIX}


@pytest.mark.parametrize("native", [True, False])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tag=st.sampled_from([1, 2, 3]), body=st.binary(max_size=200), out_size=st.integers(0, 5000))
def test_hostile_chunks_only_fail_with_codes(monkeypatch: pytest.MonkeyPatch, native: bool,
                                             tag: int, body: bytes, out_size: int) -> None:
    if not native:
        monkeypatch.setattr(chunk_mod, "_native", None)
    base = BytesBaseReader(bytes(range(256)) * 40)
    try:
        out = b"".join(decode_chunk(bytes((tag,)) + body, out_size, base))
    except BundleRejected as e:
        assert e.code in {"bundle.truncated", "bundle.delta_corrupt", "bundle.size_exceeded"}  # noqa: PT017
    else:
        assert len(out) == out_size


@pytest.mark.parametrize("native", [True, False])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_well_framed_but_forged_streams_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    native: bool, data: st.DataObject) -> None:
    # Streams that decompress fine but carry forged tables (covers past the window, runs past
    # the covers, wrong counts) reach the apply loop itself: it must refuse, not misbehave.
    if not native:
        monkeypatch.setattr(chunk_mod, "_native", None)
    old, _, chunks = _delta_chunks(tmp_path)
    c = next(c for c in chunks if c.data[0] == Tag.PATCH)
    view = memoryview(c.data)
    counts = []
    pos = 1
    for _ in range(3):
        value, pos = get_uvarint(view, pos)
        counts.append(value)
    raws = []
    for _ in range(6):
        raw, pos = decode_stream(view, pos, 1 << 24)
        raws.append(raw)
    which = data.draw(st.integers(0, 5))
    forged = bytearray(raws[which])
    if forged and data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 8))):
            forged[data.draw(st.integers(0, len(forged) - 1))] = data.draw(st.integers(0, 255))
    else:
        forged = bytearray(data.draw(st.binary(max_size=64)))
    raws[which] = bytes(forged)
    if data.draw(st.booleans()):
        counts[data.draw(st.integers(0, 2))] = data.draw(st.integers(0, 300))
    head = bytearray((Tag.PATCH,))
    for value in counts:
        put_uvarint(head, value)
    chunk = bytes(head) + b"".join(encode_stream(r, StreamOptions(lzma_lclppb=())) for r in raws)
    try:
        out = b"".join(decode_chunk(chunk, c.out_size, BytesBaseReader(old)))
    except BundleRejected as e:
        assert e.code in {"bundle.truncated", "bundle.delta_corrupt", "bundle.size_exceeded"}  # noqa: PT017
    else:
        assert len(out) == c.out_size


def test_streams_decode_while_the_window_is_read() -> None:
    """decode_all runs the base read beside the decoders; errors from either side surface."""
    rng = random.Random(7)
    # Large enough (compressed) to take the threaded path (_PARALLEL_MIN).
    raws = [rng.randbytes(150_000), bytes(300_000), rng.randbytes(90_000)]
    refs = []
    for raw in raws:
        enc = encode_stream(raw, StreamOptions(zstd_max_raw=0, lzma_lclppb=((0, 0, 0),)))
        refs.append(parse_stream(enc, 0, len(raw))[0])
    jobs = [r.decode for r in refs]
    sizes = [len(r.payload) for r in refs]
    decoded, extra = decode_all(jobs, sizes, lambda: b"window")
    assert decoded == raws
    assert extra == b"window"

    def failing_read() -> bytes:
        raise DeltaCorrupt("base image too short for this delta")

    with pytest.raises(DeltaCorrupt, match="too short"):
        decode_all(jobs, sizes, failing_read)
    # The zero stream is a few LZMA bytes: a flipped byte in it cannot decode to 300,000 zeros.
    bad = bytearray(encode_stream(raws[1], StreamOptions(zstd_max_raw=0,
                                                         lzma_lclppb=((0, 0, 0),))))
    bad[len(bad) // 2 + 4] ^= 0xFF
    jobs[1] = parse_stream(bytes(bad), 0, len(raws[1]))[0].decode
    with pytest.raises(BundleRejected):
        decode_all(jobs, sizes, lambda: b"window")


def _rewritten_pair(seed: int, size: int) -> tuple[bytes, bytes]:
    """A base and a target of which about a third is new bytes (a patch-poor chunk)."""
    rng = random.Random(seed)
    old = bytes(rng.choice(b"\0\1\2\3slotline") for _ in range(size))
    new = bytearray(old)
    for start in range(0, size, 3000):
        new[start:start + 1000] = rng.randbytes(min(1000, size - start))
    return old, bytes(new)


def test_early_prefix_candidate_does_not_change_the_output() -> None:
    # One chunk and two workers: the prefix candidate starts beside the patch (its covers
    # leave a third of the chunk as literals); with one worker it runs after. Same bytes.
    from firmware_bundles.codec.encoder import iter_delta  # noqa: PLC0415
    from firmware_bundles.codec.matcher import find_covers  # noqa: PLC0415

    old, new = _rewritten_pair(7, 96_000)
    covers = find_covers(old, new)
    alone = [c.data for c in iter_delta(old, new, covers, 1 << 20, workers=1)]
    beside = [c.data for c in iter_delta(old, new, covers, 1 << 20, workers=2)]
    assert alone == beside
    assert _apply([EncodedChunk(d, len(new)) for d in beside], old) == new


def test_large_stream_codes_only_the_trial_chosen_variant() -> None:
    from firmware_bundles.codec.streams import VARIANT_TRIAL_MIN, lzma_variants  # noqa: PLC0415

    rng = random.Random(3)
    raw = b"".join(b"\xe8" + rng.randbytes(4) + bytes(11) for _ in range(VARIANT_TRIAL_MIN // 8))
    opts = StreamOptions(lzma_x86=True, lzma_lclppb=((3, 0, 2), (0, 0, 0)))
    chosen, trial = lzma_variants(raw, opts)
    assert len(chosen) == 1
    assert trial > 0
    small, small_trial = lzma_variants(raw[:1000], opts)
    assert len(small) == 4
    assert small_trial == -1
    enc = encode_stream(raw, opts)
    assert decode_stream(enc, 0, len(raw)) == (raw, len(enc))


def test_full_chunk_is_skipped_only_where_it_cannot_win() -> None:
    from firmware_bundles.codec.encoder import full_chunk  # noqa: PLC0415

    raw = random.Random(5).randbytes(100_000)
    assert full_chunk(raw, to_beat=1000) is None  # random bytes cannot shrink to 1 %
    made = full_chunk(raw, to_beat=1 << 30)
    assert made is not None
    assert b"".join(decode_chunk(made, len(raw), None)) == raw


def _parts_stream(raw: bytes) -> bytes:
    return encode_stream(raw, StreamOptions(lzma_lclppb=((0, 0, 0),), parts_min=1))


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(min_size=2, max_size=5000))
def test_parts_stream_round_trips(raw: bytes) -> None:
    enc = _parts_stream(raw)
    assert enc[0] == Codec.LZMA_PARTS
    assert decode_stream(enc, 0, len(raw)) == (raw, len(enc))
    ref, _ = parse_stream(enc, 0, len(raw))
    assert len(ref.part_jobs()) == 2


def _rebuild(raw_len: int, props: int, payload: bytes) -> bytes:
    out = bytearray((Codec.LZMA_PARTS,))
    put_uvarint(out, raw_len)
    put_uvarint(out, len(payload))
    out.append(props)
    return bytes(out + payload)


def test_parts_stream_with_a_bad_table_is_refused() -> None:
    raw = bytes(range(256)) * 40
    enc = _parts_stream(raw)
    ref, _ = parse_stream(enc, 0, len(raw))
    payload = bytes(ref.payload)
    # Wrong part count, parts that do not add up, a table that overruns the payload.
    for bad, error in ((b"\x01" + payload[1:], DeltaCorrupt), (b"\x11" + payload[1:], DeltaCorrupt),
                       (b"", Truncated), (payload[:-1], Truncated)):
        with pytest.raises(error):
            decode_stream(_rebuild(len(raw), ref.props, bad), 0, len(raw))
    with pytest.raises(DeltaCorrupt, match="add up"):
        decode_stream(_rebuild(len(raw) - 1, ref.props, payload), 0, len(raw))


def test_corrupt_part_is_refused_and_bounded() -> None:
    raw = bytes(1000) + bytes(range(256)) * 40
    enc = bytearray(_parts_stream(raw))
    enc[-5] ^= 0xFF
    with pytest.raises(BundleRejected):
        decode_stream(bytes(enc), 0, len(raw))


def test_values_in_parts_decode_alone_and_through_the_pipeline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any values stream of 64 bytes or more coded in parts (the encoder does so for long coarse
    # ones): the chunk planner makes one job per part and joins them back in order.
    from firmware_bundles.codec import encoder  # noqa: PLC0415
    from firmware_bundles.delta import decode_chunks  # noqa: PLC0415

    parts = replace(encoder.VALUE_OPTIONS, parts_min=64)
    monkeypatch.setattr(encoder, "VALUE_OPTIONS", parts)
    monkeypatch.setattr(encoder, "COARSE_VALUE_OPTIONS", parts)
    rng = random.Random(4)
    old = _code_like(rng, 600_000)
    changed = bytearray(_mutate(rng, old, 10))
    for i in range(0, len(changed), 64):
        changed[i] = rng.randrange(256)
    new = bytes(changed)
    chunks = _roundtrip(tmp_path, old, new, chunk=65536)
    codecs = set()
    for c in chunks:
        if c.data[0] != Tag.PATCH:
            continue
        view = memoryview(c.data)
        pos = 1
        for _ in range(3):
            _, pos = get_uvarint(view, pos)
        for _ in range(6):
            ref, pos = parse_stream(view, pos, 1 << 26)
            codecs.add(ref.codec)
    assert Codec.LZMA_PARTS in codecs
    out = b"".join(decode_chunks(((c.data, c.out_size) for c in chunks), BytesBaseReader(old)))
    assert out == new
