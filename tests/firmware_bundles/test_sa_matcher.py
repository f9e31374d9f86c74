"""Our own cover search (codec/sa_matcher.py, codec/_match.c) and the encoder's C helpers."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydivsufsort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_delta import _code_like, _mutate

from firmware_bundles.codec import _match, encoder, sa_matcher
from firmware_bundles.codec.matcher import Covers
from firmware_bundles.delta import BytesBaseReader, decode_chunk, encode_delta

CHUNK = 8192


def _check_covers(cv: Covers, old: bytes, new: bytes, start: int, end: int) -> None:
    """Sorted, disjoint, non-empty and inside both images and the asked range."""
    assert len(cv.old_pos) == len(cv.new_pos) == len(cv.length)
    at = start
    for o, n, ln in zip(cv.old_pos.tolist(), cv.new_pos.tolist(), cv.length.tolist(),
                        strict=True):
        assert ln > 0
        assert at <= n
        assert n + ln <= end
        assert o >= 0
        assert o + ln <= len(old)
        at = n + ln
    assert at <= end


def _decode(chunks: list[tuple[bytes, int]], old: bytes) -> bytes:
    base = BytesBaseReader(old)
    return b"".join(b"".join(decode_chunk(d, n, base)) for d, n in chunks)


def _pair(seed: int, size: int, edits: int) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    old = _code_like(rng, size)
    return old, _mutate(rng, old, edits)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 40_000), edits=st.integers(0, 12),
       cut=st.integers(1, 5000))
def test_covers_are_valid_for_any_range(seed: int, size: int, edits: int, cut: int) -> None:
    old, new = _pair(seed, size, edits)
    index = sa_matcher.SuffixIndex(old)
    for start in range(0, len(new) + 1, cut):
        end = min(len(new), start + cut)
        _check_covers(index.covers(new, start, end), old, new, start, end)


@settings(max_examples=30, deadline=None)
@given(old=st.binary(max_size=2000), new=st.binary(max_size=2000))
def test_covers_of_random_and_tiny_inputs_are_valid(old: bytes, new: bytes) -> None:
    index = sa_matcher.SuffixIndex(old)
    _check_covers(index.covers(new), old, new, 0, len(new))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 40_000), edits=st.integers(0, 12))
def test_per_chunk_covers_round_trip(seed: int, size: int, edits: int) -> None:
    old, new = _pair(seed, size, edits)
    index = sa_matcher.SuffixIndex(old)
    chunks = list(encoder.iter_delta(old, new, lambda c0, c1: index.covers(new, c0, c1), CHUNK))
    assert _decode([(c.data, c.out_size) for c in chunks], old) == new


def test_identical_and_shifted_images_are_covered() -> None:
    old = _code_like(random.Random(5), 200_000)
    index = sa_matcher.SuffixIndex(old)
    same = index.covers(old)
    assert same.length.tolist() == [len(old)]
    shifted = b"\x90" * 333 + old
    cv = index.covers(shifted)
    assert int(cv.length.sum()) >= len(old)
    assert set((cv.old_pos - cv.new_pos).tolist()) == {-333}


def test_moved_code_with_changed_pointers_is_one_approximate_cover() -> None:
    # Code moved by 4 KiB whose every 16th byte changed (relocated pointers): one line,
    # with the changed bytes as differences, not hundreds of short exact matches.
    rng = random.Random(9)
    body = bytearray(_code_like(rng, 64_000))
    old = rng.randbytes(4096) + bytes(body)
    for i in range(0, len(body), 16):
        body[i] = (body[i] + 1) % 256
    new = bytes(body)
    cv = sa_matcher.SuffixIndex(old).covers(new)
    assert len(cv.length) <= 3
    assert int(cv.length.sum()) >= len(new) - 64
    assert set((cv.old_pos - cv.new_pos).tolist()) == {4096}


def test_zero_filled_images_do_not_stall() -> None:
    # Long runs of one byte are where a naive suffix-array scan compares quadratically.
    old = bytearray(8 << 20)
    new = bytearray(8 << 20)
    for i in range(0, len(new), 1 << 20):
        new[i + 7] = 1
    cv = sa_matcher.SuffixIndex(bytes(old)).covers(bytes(new))
    assert int(cv.length.sum()) >= len(new) - 64
    assert len(cv.length) <= 16


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_split_index_finds_matches_in_every_part(parts: int) -> None:
    # Each part has its own suffix array; a block moved from any part is still found, and a
    # match across a part boundary becomes (at most) two covers.
    rng = random.Random(parts)
    old = _code_like(rng, 9 << 20)
    blocks = [old[i:i + 50_000] for i in (100, 3 << 20, 5 << 20, (9 << 20) - 60_000)]
    new = b"".join(reversed(blocks)) + old[(2 << 20) - 30_000:(2 << 20) + 30_000]
    split = sa_matcher.SuffixIndex(old, parts=parts)
    assert len(split._parts) == parts
    cv = split.covers(new)
    _check_covers(cv, old, new, 0, len(new))
    assert int(cv.length.sum()) >= len(new) - 64
    whole = sa_matcher.SuffixIndex(old, parts=1).covers(new)
    assert int(whole.length.sum()) >= len(new) - 64


def test_int64_suffix_array_gives_the_same_covers() -> None:
    old, new = _pair(3, 50_000, 8)
    sa32 = pydivsufsort.divsufsort(old)
    sa64 = pydivsufsort.divsufsort(old, force64=True)
    assert sa64.dtype == np.int64
    a = _match.find_covers(old, new, [(sa32, _match.build_index(old, sa32))], 0, len(new))
    b = _match.find_covers(old, new, [(sa64, _match.build_index(old, sa64))], 0, len(new))
    assert a == b


def test_foreign_or_malformed_index_is_refused() -> None:
    old, new = _pair(4, 30_000, 4)
    sa = pydivsufsort.divsufsort(old)
    index = _match.build_index(old, sa)
    with pytest.raises(ValueError, match="length differs"):
        _match.build_index(old, sa[:-1])
    with pytest.raises(ValueError, match="int32 or int64"):
        _match.build_index(old, sa.astype(np.float32))
    shuffled = sa.copy()
    np.random.default_rng(1).shuffle(shuffled)
    with pytest.raises(ValueError, match="does not belong"):
        _match.build_index(old, shuffled)
    other = old[:20_000]
    with pytest.raises(ValueError, match="index does not belong"):
        _match.find_covers(other, new, [(pydivsufsort.divsufsort(other), index)], 0, len(new))
    with pytest.raises(ValueError, match="length differs"):
        _match.find_covers(old, new, [(sa[:100], index)], 0, len(new))
    with pytest.raises(ValueError, match="outside the new image"):
        _match.find_covers(old, new, [(sa, index)], 0, len(new) + 1)
    with pytest.raises(ValueError, match="outside the new image"):
        _match.find_covers(old, new, [(sa, index)], 10, 5)
    with pytest.raises(ValueError, match="parts"):
        _match.find_covers(old, new, [], 0, len(new))
    with pytest.raises(ValueError, match="part outside"):
        _match.build_index(old, sa, 10, len(old))


def test_garbage_bucket_table_cannot_read_out_of_bounds() -> None:
    # The index is our own bytes, but a wrong one must give poor covers, not a crash.
    old, new = _pair(6, 30_000, 4)
    sa = pydivsufsort.divsufsort(old)
    index = bytearray(_match.build_index(old, sa))
    rng = random.Random(2)
    for i in range(16, 65539 * 8, 8):
        index[i:i + 8] = rng.randrange(-(1 << 40), 1 << 40).to_bytes(8, "little", signed=True)
    raw = _match.find_covers(old, new, [(sa, bytes(index))], 0, len(new))
    v = np.frombuffer(raw, np.int64).reshape(-1, 3)
    _check_covers(Covers(v[:, 0], v[:, 1], v[:, 2]), old, new, 0, len(new))


@settings(max_examples=200, deadline=None)
@given(diff=st.binary(max_size=3000).map(lambda b: bytes(x if x % 3 else 0 for x in b)),
       min_zero=st.sampled_from([1, 2, 5, 512]))
def test_c_run_split_matches_numpy(diff: bytes, min_zero: int) -> None:
    z, nz, values = encoder._diff_runs(np.frombuffer(diff, np.uint8), min_zero)
    assert _match.diff_runs(diff, min_zero) == (len(z), encoder.uvarints(z),
                                                encoder.uvarints(nz), values)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(1, 20_000), edits=st.integers(0, 8))
def test_c_split_matches_numpy(seed: int, size: int, edits: int,
                               ) -> None:
    old, new = _pair(seed, size, edits)
    cv = sa_matcher.SuffixIndex(old).covers(new)
    o_arr, n_arr = np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)
    native = encoder._split(o_arr, n_arr, cv.old_pos, cv.new_pos, cv.length)
    saved = encoder._native
    try:
        encoder._native = None
        fallback = encoder._split(o_arr, n_arr, cv.old_pos, cv.new_pos, cv.length)
    finally:
        encoder._native = saved
    assert native == fallback


def test_c_split_refuses_covers_outside_or_out_of_order() -> None:
    old, new = b"a" * 100, b"b" * 100
    arr = lambda *v: np.array(v, np.int64)  # noqa: E731
    with pytest.raises(ValueError, match="outside"):
        _match.split_chunk(old, new, arr(95), arr(0), arr(10))
    with pytest.raises(ValueError, match="outside"):
        _match.split_chunk(old, new, arr(0, 0), arr(50, 10), arr(5, 5))
    with pytest.raises(ValueError, match="differ in length"):
        _match.split_chunk(old, new, arr(0), arr(0, 1), arr(5))


@pytest.mark.parametrize("ours", [True, False])
def test_encode_delta_with_either_matcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          ours: bool) -> None:
    # Without pydivsufsort or the extension the encoder falls back to HDiffPatch's matcher.
    if not ours:
        monkeypatch.setattr(sa_matcher, "available", lambda: False)
    old, new = _pair(11, 300_000, 20)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    chunks = list(encode_delta(tmp_path / "old", tmp_path / "new", chunk_out_size=65536))
    assert _decode([(c.data, c.out_size) for c in chunks], old) == new
    assert sum(len(c.data) for c in chunks) < len(new) // 4
