"""The chunk format: a tag byte, then streams. Decoding is pure and bounded.

A chunk is self-contained: it decodes from its own bytes plus reads of the base image at the
positions it names, into exactly ``out_size`` bytes.

``FULL``  (tag 0x01): ``stream(new bytes)``.
``PREFIX`` (tag 0x03): ``start:uleb | length:uleb | zstd frame``: the chunk compressed by zstd
with ``base[start:start+length]`` (at most ``2 * out_size`` bytes) as its prefix, like
``zstd --patch-from`` limited to one window; wins where code was rewritten rather than moved.
``PATCH`` (tag 0x02): ``nwin:uleb | ncov:uleb | nrun:uleb | stream(windows) | stream(covers) |
stream(zero runs) | stream(value runs) | stream(values) | stream(literals)``.

- *windows* are the base ranges the chunk reads, sorted and disjoint:
  ``nwin`` u64 start gaps (from the previous window's end) then ``nwin`` u32 lengths, each
  array stored as byte planes (all low bytes, then the next byte, ...: compresses better).
  The decoder reads them with one ``pread`` each into one buffer, the *window* (at most
  ``2 * out_size`` bytes, so decode memory stays bounded by the chunk size).
- *covers* (bsdiff/HDiffPatch style approximate matches), in output order: ``ncov`` u32
  literal-run lengths before the cover, ``ncov`` u32 cover lengths, ``ncov`` u32 zigzag
  deltas of the cover's position in the window (from the previous cover's end), byte planes.
- *diff*: over the covered bytes (all covers in order), ``new - base`` byte-wise (mod 256);
  mostly zeros on executables, where shifted addresses change a few bytes here and there. It is
  run-length coded as ``nrun`` pairs (zero-run length, value-run length), each kind in its own
  stream of LEB128 numbers, plus the values of the value runs; zeros fill the rest. Separate
  streams compress far better than the raw diff (the zero-run lengths alone are most of it).
- *literals*: the output bytes not in any cover, in order (the tail after the last cover too).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from firmware_bundles.codec.streams import (
    MAX_STREAM_RAW,
    Codec,
    decode_all,
    decode_prefixed,
    get_uvarint,
    join_parts,
    parse_stream,
)
from firmware_bundles.errors import BundleError, DeltaCorrupt, SizeExceeded, Truncated

if TYPE_CHECKING:  # numpy (about 20 MiB of RSS) loads only for the encoder and the fallback
    import numpy as np

try:  # the C apply loop (setup.py builds it); the numpy path below is the fallback
    from firmware_bundles.codec import _apply as _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised by forcing _native = None in tests
    _native = None

# Largest out_size a chunk may declare: decoding one chunk holds a few buffers of this size.
MAX_CHUNK_OUT = 16 << 20
# decode_cost reads a window table of up to this many windows (a few hundred bytes in
# practice) to charge the exact window size; longer tables are charged the 2 * out_size limit.
_EXACT_WINDOW_MAX = 4096


class Tag(enum.IntEnum):
    """First byte of every chunk: which layout follows."""

    FULL = 0x01
    PATCH = 0x02
    PREFIX = 0x03


class Reader(Protocol):
    """Random reads of the base image (``firmware_bundles.delta.BaseReader``)."""

    size: int

    def pread(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``."""
        ...


def planes(values: np.ndarray, width: int) -> bytes:
    """Little-endian ``width``-byte integers as byte planes (low bytes first)."""
    import numpy as np  # noqa: PLC0415 - see the TYPE_CHECKING import
    arr = np.ascontiguousarray(values, dtype=f"<u{width}")
    return arr.view(np.uint8).reshape(-1, width).T.tobytes()


def unplanes(raw: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`planes`; returns uint64."""
    import numpy as np  # noqa: PLC0415 - see the TYPE_CHECKING import
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(width, count).T.copy()
    return arr.view(f"<u{width}").reshape(count).astype(np.uint64)


def zigzag(values: np.ndarray) -> np.ndarray:
    """Signed to unsigned (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    import numpy as np  # noqa: PLC0415 - see the TYPE_CHECKING import
    v = values.astype(np.int64)
    return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def unzigzag(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag`; returns int64."""
    import numpy as np  # noqa: PLC0415 - see the TYPE_CHECKING import
    v = values.astype(np.uint64)
    return ((v >> np.uint64(1)).astype(np.int64)) ^ -((v & np.uint64(1)).astype(np.int64))


@dataclass(frozen=True)
class ChunkPlan:
    """A chunk split into independent jobs plus the step that joins their results.

    ``jobs`` may run in any order and on any thread (stream decompressions and base reads,
    which release the GIL); ``finish`` takes their results in job order and returns the
    chunk's output, raising the first job's error in job order, so a chunk fails with the same
    error however its jobs were scheduled.
    """

    jobs: tuple[Callable[[], bytes], ...]
    sizes: tuple[int, ...]  # input bytes of each job: larger ones are started first
    finish: Callable[[Sequence[bytes]], bytes]


def plan_chunk(data: bytes, out_size: int, base: Reader | None) -> ChunkPlan:
    """Parse a chunk's headers (no decompression) into a :class:`ChunkPlan`.

    Raises:
        DeltaCorrupt, SizeExceeded, Truncated: bad headers (stable codes); errors in the
            payloads surface from the jobs.
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
        ref, end = parse_stream(view, 1, out_size)

        def full(results: Sequence[bytes]) -> bytes:
            if end != len(view):
                raise DeltaCorrupt("trailing bytes after a full chunk")
            if len(results[0]) != out_size:
                raise Truncated("full chunk shorter than its out_size")
            return results[0]

        return ChunkPlan((ref.decode,), (len(view),), full)
    if tag is Tag.PATCH:
        return _plan_patch(view, out_size, base)
    return ChunkPlan((lambda: _decode_prefix(view, out_size, base),), (len(view),), _only)


def _only(results: Sequence[bytes]) -> bytes:
    return results[0]


def decode_chunk(data: bytes, out_size: int, base: Reader | None) -> Iterator[bytes]:
    """Decode one chunk into exactly ``out_size`` bytes (see module docstring).

    The chunk's large streams decode on two threads while the base window is read
    (``streams.decode_all``); ``codec/pipeline.py`` runs the jobs of several chunks instead.

    Raises:
        DeltaCorrupt, SizeExceeded, Truncated: on any inconsistency (stable codes).
    """
    plan = plan_chunk(data, out_size, base)
    if len(plan.jobs) == 1:
        yield plan.finish([plan.jobs[0]()])
        return
    window_job, *stream_jobs = plan.jobs
    # The base window is read on this thread while the streams decode on the pool: the read
    # overlaps the decompression instead of following it.
    streams, window = decode_all(stream_jobs, plan.sizes[1:], window_job)
    yield plan.finish([window, *streams])


def decode_cost(data: bytes, out_size: int) -> int:
    """An upper bound of the bytes decoding this chunk can hold, from its headers only.

    The chunk's own bytes, its output, every stream's declared decoded length (a stream never
    decodes to more) and the base window it reads (summed from a short window table, else the
    ``2 * out_size`` limit; a prefix chunk's declared window). No decompression of the large
    streams; a chunk whose headers do not parse is charged as a full chunk and refused by
    the decoder later, in order.
    """
    out_size = min(max(out_size, 0), MAX_CHUNK_OUT)
    base = len(data) + out_size
    try:
        view = memoryview(data)
        tag = Tag(view[0])
        if tag is Tag.FULL:
            return base + parse_stream(view, 1, out_size)[0].raw_len
        if tag is Tag.PREFIX:
            _start, pos = get_uvarint(view, 1)
            length, _pos = get_uvarint(view, pos)
            return base + min(length, 2 * out_size)
        nwin, pos = get_uvarint(view, 1)
        for _ in range(2):
            _n, pos = get_uvarint(view, pos)
        refs = []
        for _ in range(6):
            ref, pos = parse_stream(view, pos, MAX_STREAM_RAW)
            refs.append(ref)
        window = 2 * out_size
        if refs[0].raw_len == nwin * 12 and nwin <= _EXACT_WINDOW_MAX:
            # A small table: sum its lengths (what _read_windows will read) rather than
            # charging the 2 * out_size limit; the window is usually about one out_size.
            window = min(window, sum(_uint_planes(refs[0].decode()[nwin * 8:], nwin, 4)))
    except (BundleError, ValueError, IndexError):
        return base + out_size
    # A stream in parts is held twice while its parts are joined.
    return base + window + sum(r.raw_len * (2 if r.codec is Codec.LZMA_PARTS else 1)
                               for r in refs)


def _plan_patch(view: memoryview, out_size: int, base: Reader | None) -> ChunkPlan:
    if base is None:
        raise DeltaCorrupt("a delta chunk needs a base image")
    nwin, pos = get_uvarint(view, 1)
    ncov, pos = get_uvarint(view, pos)
    nrun, pos = get_uvarint(view, pos)
    if max(nwin, ncov, nrun) > out_size:
        raise DeltaCorrupt("more windows, covers or runs than output bytes")
    refs = []
    for limit in (nwin * 12, ncov * 12, nrun * 10, nrun * 10, out_size, out_size):
        ref, pos = parse_stream(view, pos, limit)
        refs.append(ref)
    if pos != len(view):
        raise DeltaCorrupt("trailing bytes after a delta chunk")

    def window() -> bytes:
        wraw = refs[0].decode()
        if len(wraw) != nwin * 12:
            raise DeltaCorrupt("window table of the wrong size")
        return _read_windows(wraw, nwin, out_size, base)

    # A stream in parts (Codec.LZMA_PARTS) is one job per part, so its parts decode side by
    # side; finish joins them back in order.
    jobs: list[Callable[[], bytes]] = [window]
    sizes = [len(refs[0].payload)]
    spans = [(0, 1)]
    for r in refs[1:]:
        parts = r.part_jobs()
        spans.append((len(jobs), len(jobs) + len(parts)))
        jobs += parts
        sizes += [len(r.payload) // len(parts)] * len(parts)

    def finish(results: Sequence[bytes]) -> bytes:
        window, ctrl, zruns, nzruns, values, lit = (
            results[a] if b == a + 1 else join_parts(results[a:b], ref.raw_len)
            for (a, b), ref in zip(spans, refs, strict=True))
        return _apply(out_size, window, ctrl, ncov=ncov, zruns=zruns, nzruns=nzruns,
                      nrun=nrun, values=values, lit=lit)

    return ChunkPlan(tuple(jobs), tuple(sizes), finish)


def _apply(out_size: int, window: bytes, ctrl: bytes, *, ncov: int, zruns: bytes,
           nzruns: bytes, nrun: int, values: bytes, lit: bytes) -> bytes:
    if len(ctrl) != ncov * 12:
        raise DeltaCorrupt("cover table of the wrong size")
    if _native is not None:
        try:
            out: bytes = _native.apply_patch(out_size, window, ctrl, ncov, zruns, nzruns,
                                             nrun, values, lit)
        except ValueError as e:
            raise DeltaCorrupt(f"delta chunk inconsistent: {e}") from e
        return out
    import numpy as np  # noqa: PLC0415 - the fallback only

    return _apply_numpy(np.frombuffer(window, np.uint8), ctrl, ncov, zruns=zruns,
                        nzruns=nzruns, nrun=nrun, values=values, lit=lit, out_size=out_size)


def _decode_prefix(view: memoryview, out_size: int, base: Reader | None) -> bytes:
    if base is None:
        raise DeltaCorrupt("a delta chunk needs a base image")
    start, pos = get_uvarint(view, 1)
    length, pos = get_uvarint(view, pos)
    if length > max(2 * out_size, 1) or start > base.size or length > base.size - start:
        raise DeltaCorrupt("prefix window outside the base image or too large")
    window = base.pread(start, length)
    if len(window) != length:
        raise DeltaCorrupt("base image too short for this delta")
    return decode_prefixed(view[pos:], window, out_size)


def _read_windows(wraw: bytes, nwin: int, out_size: int, base: Reader) -> bytes:
    """Read the chunk's base ranges into one buffer (at most ``2 * out_size`` bytes).

    Plain Python, not numpy: the table is small and this is the only numpy use on the path
    of the C apply loop, where importing numpy would cost about 20 MiB of a device's RSS.
    """
    wgap = _uint_planes(wraw[: nwin * 8], nwin, 8)
    wlen = _uint_planes(wraw[nwin * 8:], nwin, 4)
    if nwin and max(wgap) > base.size:
        raise DeltaCorrupt("window outside the base image")
    total_win = sum(wlen)
    if total_win > 2 * out_size:
        raise DeltaCorrupt("delta chunk reads more base than it may")
    wstart = []
    end = 0
    for gap, length in zip(wgap, wlen, strict=True):
        wstart.append(end + gap)  # gaps count from the previous window's end
        end += gap + length
    if nwin and end > base.size:
        raise DeltaCorrupt("base image too short for this delta")
    pieces = []
    for start, length in zip(wstart, wlen, strict=True):
        piece = base.pread(start, length)
        if len(piece) != length:
            raise DeltaCorrupt("base image too short for this delta")
        pieces.append(piece)
    # One window (the common case) is used as read; several are joined in one pass.
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _uint_planes(raw: bytes, count: int, width: int) -> list[int]:
    """Inverse of :func:`planes` as Python ints (``raw`` holds exactly ``count * width``)."""
    rows = zip(*(raw[j * count:(j + 1) * count] for j in range(width)), strict=True)
    return [int.from_bytes(bytes(row), "little") for row in rows]


def decode_uvarints(raw: bytes, count: int) -> np.ndarray:
    """``count`` unsigned LEB128 numbers filling ``raw`` exactly (vectorised)."""
    import numpy as np  # noqa: PLC0415 - see the TYPE_CHECKING import
    b = np.frombuffer(raw, np.uint8)
    last = b < 0x80
    if int(last.sum()) != count or (len(b) and not last[-1]):
        raise DeltaCorrupt("varint stream does not hold the declared count")
    if count == 0:
        return np.zeros(0, np.int64)
    starts = np.concatenate(([0], np.flatnonzero(last)[:-1] + 1))
    vid = np.repeat(np.arange(count), np.diff(np.concatenate((starts, [len(b)]))))
    shift = (np.arange(len(b)) - starts[vid]) * 7
    if int(shift.max()) > 56:
        raise DeltaCorrupt("varint too long")
    parts = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, starts).astype(np.int64)


def _apply_numpy(window: np.ndarray, ctrl: bytes, ncov: int, *, zruns: bytes, nzruns: bytes,
                 nrun: int, values: bytes, lit: bytes, out_size: int) -> bytes:
    """Fallback when the C helper is not built: same checks, vectorised, more memory."""
    import numpy as np  # noqa: PLC0415 - see the TYPE_CHECKING import
    gaps = unplanes(ctrl[: ncov * 4], ncov, 4).astype(np.int64)
    lens = unplanes(ctrl[ncov * 4: ncov * 8], ncov, 4).astype(np.int64)
    wdelta = unzigzag(unplanes(ctrl[ncov * 8:], ncov, 4))
    covered = int(lens.sum())
    if int(gaps.sum()) + covered > out_size:
        raise DeltaCorrupt("delta chunk inconsistent: covers exceed the chunk")
    if len(lit) != out_size - covered:
        raise DeltaCorrupt("delta chunk inconsistent: literal stream of the wrong size")
    wpos = np.cumsum(wdelta) + (np.cumsum(lens) - lens)
    if ncov and (int(wpos.min()) < 0 or int((wpos + lens).max()) > len(window)):
        raise DeltaCorrupt("delta chunk inconsistent: cover outside the base window")
    zr = decode_uvarints(zruns, nrun)
    nz = decode_uvarints(nzruns, nrun)
    if nrun and (int(zr.max()) > covered or int(nz.max()) > covered or int(zr.min()) < 0
                 or int(nz.min()) < 0):  # bound each before summing (no int64 overflow)
        raise DeltaCorrupt("delta chunk inconsistent: diff run longer than the covers")
    if int(zr.sum()) + int(nz.sum()) > covered or int(nz.sum()) != len(values):
        raise DeltaCorrupt("delta chunk inconsistent: diff runs do not fit the covers")
    diff = np.zeros(covered, np.uint8)
    run_start = np.cumsum(zr) + (np.cumsum(nz) - nz)
    diff[np.repeat(run_start - (np.cumsum(nz) - nz), nz)
         + np.arange(len(values), dtype=np.int64)] = np.frombuffer(values, np.uint8)
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
    out[mask] = window[src] + diff
    out[~mask] = np.frombuffer(lit, np.uint8)
    return out.tobytes()
