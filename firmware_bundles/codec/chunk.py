"""The chunk format: a tag byte, then streams. Decoding is pure and bounded.

A chunk is self-contained: it decodes from its own bytes plus reads of the base image at the
positions it names, into exactly ``out_size`` bytes.

``FULL``  (tag 0x01): ``stream(new bytes)``.
``PATCH`` (tag 0x02): ``nwin:uleb | ncov:uleb | stream(windows) | stream(covers) |
stream(diff) | stream(literals)``.

- *windows* are the base ranges the chunk reads, sorted and disjoint:
  ``nwin`` u64 start gaps (from the previous window's end) then ``nwin`` u32 lengths, each
  array stored as byte planes (all low bytes, then the next byte, ...: compresses better).
  The decoder reads them with one ``pread`` each into one buffer, the *window* (at most
  ``2 * out_size`` bytes, so decode memory stays bounded by the chunk size).
- *covers* (bsdiff/HDiffPatch style approximate matches), in output order: ``ncov`` u32
  literal-run lengths before the cover, ``ncov`` u32 cover lengths, ``ncov`` u32 zigzag
  deltas of the cover's position in the window (from the previous cover's end), byte planes.
- *diff*: for each cover, ``new - base`` byte-wise (mod 256); mostly zeros on executables,
  where shifted addresses change a few bytes per instruction.
- *literals*: the output bytes not in any cover, in order (the tail after the last cover too).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from firmware_bundles.codec.streams import decode_stream, get_uvarint
from firmware_bundles.errors import DeltaCorrupt, SizeExceeded, Truncated

# Largest out_size a chunk may declare: decoding one chunk holds a few buffers of this size.
MAX_CHUNK_OUT = 16 << 20
# Apply yields the output in pieces of at most this many bytes.
YIELD_PIECE = 1 << 20


class Tag(enum.IntEnum):
    """First byte of every chunk: which layout follows."""

    FULL = 0x01
    PATCH = 0x02


class Reader(Protocol):
    """Random reads of the base image (``firmware_bundles.delta.BaseReader``)."""

    size: int

    def pread(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``."""
        ...


def planes(values: np.ndarray, width: int) -> bytes:
    """Little-endian ``width``-byte integers as byte planes (low bytes first)."""
    arr = np.ascontiguousarray(values, dtype=f"<u{width}")
    return arr.view(np.uint8).reshape(-1, width).T.tobytes()


def unplanes(raw: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`planes`; returns uint64."""
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(width, count).T.copy()
    return arr.view(f"<u{width}").reshape(count).astype(np.uint64)


def zigzag(values: np.ndarray) -> np.ndarray:
    """Signed to unsigned (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    v = values.astype(np.int64)
    return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def unzigzag(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag`; returns int64."""
    v = values.astype(np.uint64)
    return ((v >> np.uint64(1)).astype(np.int64)) ^ -((v & np.uint64(1)).astype(np.int64))


def decode_chunk(data: bytes, out_size: int, base: Reader | None) -> Iterator[bytes]:
    """Decode one chunk into exactly ``out_size`` bytes (see module docstring).

    Raises:
        DeltaCorrupt, SizeExceeded, Truncated: on any inconsistency (stable codes).
    """
    if not 0 <= out_size <= MAX_CHUNK_OUT:
        raise SizeExceeded(f"chunk out_size {out_size} outside 0..{MAX_CHUNK_OUT}")
    if not data:
        raise Truncated("empty chunk")
    view = memoryview(data)
    try:
        tag = Tag(view[0])
    except ValueError as e:
        raise DeltaCorrupt(f"unknown chunk tag {view[0]:#x}") from e
    if tag is Tag.FULL:
        raw, end = decode_stream(view, 1, out_size)
        if end != len(view):
            raise DeltaCorrupt("trailing bytes after a full chunk")
        if len(raw) != out_size:
            raise Truncated("full chunk shorter than its out_size")
        out: bytes | bytearray = raw
    else:
        out = _decode_patch(view, out_size, base)
    for start in range(0, out_size, YIELD_PIECE):
        yield bytes(out[start:start + YIELD_PIECE])


def _decode_patch(view: memoryview, out_size: int, base: Reader | None) -> bytes | bytearray:
    if base is None:
        raise DeltaCorrupt("a delta chunk needs a base image")
    nwin, pos = get_uvarint(view, 1)
    ncov, pos = get_uvarint(view, pos)
    if nwin > out_size or ncov > out_size:
        raise DeltaCorrupt("more windows or covers than output bytes")
    wraw, pos = decode_stream(view, pos, nwin * 12)
    craw, pos = decode_stream(view, pos, ncov * 12)
    diff, pos = decode_stream(view, pos, out_size)
    lit, pos = decode_stream(view, pos, out_size)
    if pos != len(view):
        raise DeltaCorrupt("trailing bytes after a delta chunk")
    if len(wraw) != nwin * 12 or len(craw) != ncov * 12:
        raise DeltaCorrupt("window or cover table of the wrong size")
    wgap = unplanes(wraw[: nwin * 8], nwin, 8)
    wlen = unplanes(wraw[nwin * 8:], nwin, 4)
    # Window ends must not overflow int64 and must lie inside the base image.
    if nwin and (int(wgap.max()) > base.size or int(wlen.max()) > 2 * out_size):
        raise DeltaCorrupt("window outside the base image")
    wstart = np.cumsum(wgap.astype(np.int64)) + np.concatenate(
        ([0], np.cumsum(wlen[:-1].astype(np.int64))))
    total_win = int(wlen.sum()) if nwin else 0
    if total_win > 2 * out_size:
        raise DeltaCorrupt("delta chunk reads more base than it may")
    if nwin and int(wstart[-1] + wlen[-1].astype(np.int64)) > base.size:
        raise DeltaCorrupt("delta chunk reads past the end of the base image")
    gaps = unplanes(craw[: ncov * 4], ncov, 4).astype(np.int64)
    lens = unplanes(craw[ncov * 4: ncov * 8], ncov, 4).astype(np.int64)
    wdelta = unzigzag(unplanes(craw[ncov * 8:], ncov, 4))
    covered = int(lens.sum())
    if int(gaps.sum()) + covered > out_size:
        raise DeltaCorrupt("covers exceed the chunk")
    if len(diff) != covered or len(lit) != out_size - covered:
        raise DeltaCorrupt("diff or literal stream of the wrong size")
    wpos = np.cumsum(wdelta) + (np.cumsum(lens) - lens)
    if ncov and (int(wpos.min()) < 0 or int((wpos + lens).max()) > total_win):
        raise DeltaCorrupt("cover outside the chunk's base windows")
    window = bytearray(total_win)
    at = 0
    for start, length in zip(wstart.tolist(), wlen.tolist(), strict=True):
        piece = base.pread(start, length)
        if len(piece) != length:
            raise DeltaCorrupt("base image too short for this delta")
        window[at:at + length] = piece
        at += length
    return _apply_numpy(np.frombuffer(window, np.uint8), gaps, lens, wpos, diff=diff, lit=lit,
                        out_size=out_size)


def _apply_numpy(window: np.ndarray, gaps: np.ndarray, lens: np.ndarray, wpos: np.ndarray, *,
                 diff: bytes, lit: bytes, out_size: int) -> bytes:
    """Vectorised apply: literals and (window + diff) covers into one output buffer."""
    ncov = len(lens)
    covered = len(diff)
    out = np.empty(out_size, np.uint8)
    seg = np.empty(2 * ncov + 1, np.int64)
    seg[0:-1:2] = gaps
    seg[1::2] = lens
    seg[-1] = out_size - int(gaps.sum()) - covered
    kind = np.zeros(2 * ncov + 1, bool)
    kind[1::2] = True
    mask = np.repeat(kind, seg)
    cum_excl = np.cumsum(lens) - lens
    src = np.repeat(wpos - cum_excl, lens) + np.arange(covered, dtype=np.int64)
    out[mask] = window[src] + np.frombuffer(diff, np.uint8)
    out[~mask] = np.frombuffer(lit, np.uint8)
    return out.tobytes()
