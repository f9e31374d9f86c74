"""Compressed byte streams inside a chunk: one codec byte, two lengths, the payload.

Rules:
- A stream declares its decoded length up front; the decoder never produces more than that
  (bounded decompression) and refuses a stream that produces less, more or leaves trailing bytes.
- Dictionary and window sizes of the decompressors are derived from the declared length and
  capped, so a hostile stream cannot make the decoder allocate more than ``MAX_STREAM_RAW``.
- Encoding tries the candidate codecs and keeps the smallest; decoding needs no option.

Layout: ``codec:u8 | raw_len:uleb128 | comp_len:uleb128 | [props:u8 for LZMA] | payload``.
"""

from __future__ import annotations

import enum
import lzma
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

if sys.version_info >= (3, 14):  # pragma: no cover - same API in the standard library
    from compression.zstd import (  # type: ignore[import-not-found]
        CompressionParameter,
        DecompressionParameter,
        ZstdCompressor,
        ZstdDecompressor,
        ZstdDict,
        ZstdError,
    )
else:
    from backports.zstd import (
        CompressionParameter,
        DecompressionParameter,
        ZstdCompressor,
        ZstdDecompressor,
        ZstdDict,
        ZstdError,
    )

from firmware_bundles.errors import DeltaCorrupt, SizeExceeded, Truncated

__all__ = ["Codec", "StreamOptions", "StreamRef", "ZstdCompressor", "decode_all",
           "decode_prefixed", "decode_stream", "encode_prefixed", "encode_stream",
           "get_uvarint", "join_parts", "lzma_variants", "parse_stream", "put_uvarint"]

# Largest decoded stream this build accepts: bounds every decoder buffer (chunks are at most
# MAX_CHUNK_OUT bytes of output; a window stream may be twice that plus slack).
MAX_STREAM_RAW = 80 << 20
# zstd decoder window cap (2**25 = 32 MiB): chunks are compressed one-shot with their size
# pledged, so the encoder never needs a larger window than the chunk itself.
_ZSTD_WINDOW_LOG_MAX = 25


class Codec(enum.IntEnum):
    """How one stream's payload is coded (the byte in front of it)."""

    RAW = 0
    ZSTD = 1
    LZMA = 2  # raw LZMA2, dictionary sized from raw_len, lc/lp/pb in one props byte
    LZMA_X86 = 3  # x86 branch-call-jump filter in front of LZMA2 (machine code literals)
    LZMA_PARTS = 4  # raw LZMA2 in independent parts, coded and decoded on parallel threads


def put_uvarint(out: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) as unsigned LEB128."""
    if value < 0:
        msg = "uvarint must be non-negative"
        raise ValueError(msg)
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def get_uvarint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Read an unsigned LEB128 at ``pos``; return (value, next position).

    Raises:
        Truncated: the data ends inside the number.
        DeltaCorrupt: the number is longer than 10 bytes.
    """
    value = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise Truncated("chunk ends inside a length field")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise DeltaCorrupt("length field too long")


def _dict_size(raw_len: int) -> int:
    size = 1 << 12
    while size < raw_len:
        size <<= 1
    return size


def _lzma_filters(codec: Codec, raw_len: int, props: int) -> list[dict[str, int]]:
    lc, rest = props % 9, props // 9
    lp, pb = rest % 5, rest // 5
    lzma2 = {"id": lzma.FILTER_LZMA2, "dict_size": _dict_size(raw_len), "lc": lc, "lp": lp,
             "pb": pb}
    if codec is Codec.LZMA_X86:
        return [{"id": lzma.FILTER_X86}, lzma2]
    return [lzma2]


def _lzma_props(lc: int, lp: int, pb: int) -> int:
    return (pb * 5 + lp) * 9 + lc


# zstd-19 is tried only on streams up to this size. Above it, LZMA at full strength was the
# smaller coding of every stream in the corpus runs (it models literals and positions better).
# Up to 256 KiB it won once in 48 streams of four pairs, by 19 bytes, for 0.58 CPU seconds of
# level-19 codings (python -m bench.delta_bench, 2 Dec 2026); under 16 KiB it costs ~1 ms.
ZSTD_MAX_RAW = 16 << 10
# Streams at least this large pick their LZMA variant (lc/lp/pb, BCJ or not) by a fast trial
# (preset 1) of each and code only the winner at full strength. The variants change how
# literals and positions are modelled, which shows at any preset: on the corpus the trial
# picked the full-strength winner or one within 0.3 %, for 1/5 of the time each variant costs.
VARIANT_TRIAL_MIN = 64 << 10
# A full-strength LZMA coding was 8-9 % smaller than the preset-1 trial on executables and at
# most ~17 % on text-like data; a coding is only worth its seconds where the trial, shrunk by
# this factor, could beat the best candidate so far (see the encoder's FULL chunk).
STRONG_GAIN_BOUND = 0.75


@dataclass(frozen=True)
class StreamOptions:
    """Which codecs the encoder tries for one stream (the smallest result wins)."""

    zstd_level: int = 19
    zstd_max_raw: int = ZSTD_MAX_RAW  # try zstd only on streams up to this size (encode time)
    lzma_lclppb: tuple[tuple[int, int, int], ...] = ((3, 0, 2),)  # LZMA variants to try
    lzma_x86: bool = False
    lzma_preset: int = 9  # "extreme" costs ~30 % more time for ~0.03 % smaller output here
    lzma_nice_len: int = 273  # long zero runs in diffs: longest matches pay off
    # Streams at least this long are coded in LZMA_PARTS parts on parallel threads (0: never).
    parts_min: int = 0


def _compress(codec: Codec, raw: bytes, props: int, opts: StreamOptions) -> bytes:
    if codec is Codec.ZSTD:
        comp = ZstdCompressor(options={
            CompressionParameter.compression_level: opts.zstd_level,
            CompressionParameter.window_log: max(10, min(_ZSTD_WINDOW_LOG_MAX,
                                                         (len(raw) - 1).bit_length())),
            CompressionParameter.content_size_flag: 0,
            CompressionParameter.checksum_flag: 0,
            CompressionParameter.dict_id_flag: 0,
        })
        return comp.compress(raw, ZstdCompressor.FLUSH_FRAME)
    filters = _lzma_filters(codec, len(raw), props)
    filters[-1]["preset"] = opts.lzma_preset
    filters[-1]["nice_len"] = opts.lzma_nice_len
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=filters)


def lzma_variants(raw: bytes, opts: StreamOptions) -> tuple[list[tuple[Codec, int]], int]:
    """The LZMA variants worth coding at full strength, and the best fast-trial size.

    With several variants and a stream of at least ``VARIANT_TRIAL_MIN`` bytes, each is coded
    at preset 1 and only the smallest is kept; the trial size is then returned (else -1).
    """
    variants = []
    for lc, lp, pb in opts.lzma_lclppb:
        props = _lzma_props(lc, lp, pb)
        variants.append((Codec.LZMA, props))
        if opts.lzma_x86:
            variants.append((Codec.LZMA_X86, props))
    if len(variants) < 2 or len(raw) < VARIANT_TRIAL_MIN or opts.lzma_preset <= 1:
        return variants, -1
    fast = replace(opts, lzma_preset=1)
    sizes = [len(_compress(codec, raw, props, fast)) for codec, props in variants]
    best = min(range(len(variants)), key=sizes.__getitem__)
    return [variants[best]], sizes[best]


def encode_stream(raw: bytes, opts: StreamOptions | None = None,
                  variants: list[tuple[Codec, int]] | None = None) -> bytes:
    """Code ``raw`` with every candidate of ``opts`` and return the smallest stream.

    ``variants`` (from :func:`lzma_variants`) skips choosing the LZMA variants again.
    """
    opts = opts or StreamOptions()
    if opts.parts_min and len(raw) >= opts.parts_min:
        return _encode_parts(raw, opts, variants)
    candidates: list[tuple[Codec, int, bytes]] = [(Codec.RAW, 0, raw)]
    if raw and len(raw) <= opts.zstd_max_raw:
        candidates.append((Codec.ZSTD, 0, _compress(Codec.ZSTD, raw, 0, opts)))
    if raw:
        for codec, props in variants or lzma_variants(raw, opts)[0]:
            candidates.append((codec, props, _compress(codec, raw, props, opts)))
    codec, props, payload = min(candidates,
                                key=lambda c: len(c[2]) + (c[0] >= Codec.LZMA))
    return _framed(codec, len(raw), props, payload)


def _framed(codec: Codec, raw_len: int, props: int, payload: bytes) -> bytes:
    """A stream: codec byte, the two lengths, the props byte of the LZMA codecs, payload."""
    out = bytearray((codec,))
    put_uvarint(out, raw_len)
    put_uvarint(out, len(payload))
    if codec >= Codec.LZMA:
        out.append(props)
    out += payload
    return bytes(out)


# A long stream is coded in this many parts, one per thread (two cores are the target).
PARTS = 2
_MAX_PARTS = 16


def _encode_parts(raw: bytes, opts: StreamOptions,
                  variants: list[tuple[Codec, int]] | None) -> bytes:
    """An LZMA_PARTS stream: ``raw`` cut in PARTS pieces, each raw LZMA2 on its own thread.

    Payload: ``nparts:u8 | (raw_len, comp_len) per part as uleb128 | the parts' payloads``.
    The parts share the stream's props (its first LZMA variant). Each part loses the
    dictionary of the parts before it: +0.2 % on cryptography's 1.6-3.6 MB coarse values
    streams, +2 % on 0.4-0.6 MB ones, for half the wall time on two cores (and the decoder
    can use two as well).
    """
    codec, props = (variants or lzma_variants(raw, opts)[0])[0]
    if codec is not Codec.LZMA:
        codec, props = Codec.LZMA, _lzma_props(0, 0, 0)
    bounds = [len(raw) * i // PARTS for i in range(PARTS + 1)]
    pieces = [raw[bounds[i]:bounds[i + 1]] for i in range(PARTS)]
    with ThreadPoolExecutor(max_workers=PARTS, thread_name_prefix="lzma-part") as pool:
        coded = list(pool.map(lambda p: _compress(codec, p, props, opts), pieces))
    head = bytearray((PARTS,))
    for piece, c in zip(pieces, coded, strict=True):
        put_uvarint(head, len(piece))
        put_uvarint(head, len(c))
    return _framed(Codec.LZMA_PARTS, len(raw), props, bytes(head) + b"".join(coded))


def encode_streams(raws: Iterable[bytes], opts: StreamOptions | None = None) -> bytes:
    """Concatenate :func:`encode_stream` of each raw stream."""
    return b"".join(encode_stream(r, opts) for r in raws)


def _decompress(codec: Codec, payload: memoryview, raw_len: int, props: int) -> bytes:
    try:
        dec: ZstdDecompressor | lzma.LZMADecompressor
        if codec is Codec.ZSTD:
            dec = ZstdDecompressor(options={
                DecompressionParameter.window_log_max: _ZSTD_WINDOW_LOG_MAX})
        else:
            if props >= 9 * 5 * 5:
                raise DeltaCorrupt("bad LZMA properties")
            dec = lzma.LZMADecompressor(
                format=lzma.FORMAT_RAW, filters=_lzma_filters(codec, raw_len, props))
        # max_length bounds the output: a bomb stops at raw_len + 1 bytes.
        out: bytes = dec.decompress(bytes(payload), max_length=raw_len + 1)
    except (ZstdError, lzma.LZMAError) as e:
        raise DeltaCorrupt(f"stream does not decompress: {e}") from e
    if len(out) > raw_len:
        raise SizeExceeded("stream decodes to more bytes than it declares")
    if len(out) < raw_len:
        raise DeltaCorrupt("stream decodes to fewer bytes than it declares")
    if codec is Codec.ZSTD and not dec.eof:
        raise DeltaCorrupt("zstd frame does not end where the stream does")
    if dec.unused_data:
        raise DeltaCorrupt("trailing bytes after a compressed stream")
    return out


@dataclass(frozen=True)
class StreamRef:
    """A parsed stream header: what :meth:`decode` will decompress (checked up front)."""

    codec: Codec
    raw_len: int
    props: int
    payload: memoryview

    def decode(self) -> bytes:
        """Decompress to exactly ``raw_len`` bytes (errors as in :func:`decode_stream`)."""
        if self.codec is Codec.RAW:
            return bytes(self.payload)
        if self.codec is Codec.LZMA_PARTS:
            return join_parts([job() for job in self.part_jobs()], self.raw_len)
        return _decompress(self.codec, self.payload, self.raw_len, self.props)

    def part_jobs(self) -> list[Callable[[], bytes]]:
        """The independent decodes this stream is made of (one unless LZMA_PARTS).

        Join their results with :func:`join_parts`. Raises DeltaCorrupt or Truncated for a bad
        parts table (checked here, before anything is decompressed).
        """
        if self.codec is not Codec.LZMA_PARTS:
            return [self.decode]
        view = self.payload
        if not view:
            raise Truncated("parts stream without a parts count")
        count = view[0]
        if not 2 <= count <= _MAX_PARTS:
            raise DeltaCorrupt(f"parts stream with {count} parts")
        pos = 1
        sizes = []
        for _ in range(count):
            raw_len, pos = get_uvarint(view, pos)
            comp_len, pos = get_uvarint(view, pos)
            sizes.append((raw_len, comp_len))
        if sum(r for r, _ in sizes) != self.raw_len:
            raise DeltaCorrupt("parts do not add up to the stream's length")
        if pos + sum(c for _, c in sizes) != len(view):
            raise Truncated("parts stream payload does not match its parts table")
        jobs: list[Callable[[], bytes]] = []
        for raw_len, comp_len in sizes:
            if raw_len == 0:
                raise DeltaCorrupt("empty part in a parts stream")
            piece = view[pos:pos + comp_len]
            jobs.append(partial(_decompress, Codec.LZMA, piece, raw_len, self.props))
            pos += comp_len
        return jobs


def join_parts(results: Sequence[bytes], raw_len: int) -> bytes:
    """One stream from its parts' results (see :meth:`StreamRef.part_jobs`)."""
    out = results[0] if len(results) == 1 else b"".join(results)
    if len(out) != raw_len:
        raise DeltaCorrupt("stream parts decode to the wrong length")
    return out


def parse_stream(data: bytes | memoryview, pos: int, max_raw: int) -> tuple[StreamRef, int]:
    """Parse the stream header at ``pos``; return (stream, next position). No decompression.

    Raises:
        Truncated: the chunk ends inside the stream.
        SizeExceeded: the stream declares more than ``max_raw`` bytes.
        DeltaCorrupt: unknown codec or inconsistent lengths.
    """
    view = memoryview(data)
    if pos >= len(view):
        raise Truncated("chunk ends before a stream")
    try:
        codec = Codec(view[pos])
    except ValueError as e:
        raise DeltaCorrupt(f"unknown stream codec {view[pos]}") from e
    raw_len, pos = get_uvarint(view, pos + 1)
    comp_len, pos = get_uvarint(view, pos)
    if raw_len > min(max_raw, MAX_STREAM_RAW):
        raise SizeExceeded(f"stream declares {raw_len} bytes, at most {max_raw} allowed")
    props = 0
    if codec >= Codec.LZMA:
        if pos >= len(view):
            raise Truncated("chunk ends inside a stream header")
        props = view[pos]
        pos += 1
    end = pos + comp_len
    if end > len(view):
        raise Truncated("chunk ends inside a stream")
    if codec is Codec.RAW and comp_len != raw_len:
        raise DeltaCorrupt("raw stream length mismatch")
    if codec is not Codec.RAW and raw_len == 0:
        raise DeltaCorrupt("empty streams are stored raw")
    return StreamRef(codec, raw_len, props, view[pos:end]), end


def decode_stream(data: bytes | memoryview, pos: int, max_raw: int) -> tuple[bytes, int]:
    """Decode the stream at ``pos``; return (raw bytes, next position).

    Raises:
        Truncated: the chunk ends inside the stream.
        SizeExceeded: the stream declares or produces more than ``max_raw`` bytes.
        DeltaCorrupt: unknown codec or the payload does not decode to the declared length.
    """
    ref, end = parse_stream(data, pos, max_raw)
    return ref.decode(), end


def _prefix_window_log(prefix_len: int, out_size: int) -> int:
    return max(10, min(_ZSTD_WINDOW_LOG_MAX, (prefix_len + out_size - 1).bit_length()))


def _as_prefix(prefix: bytes) -> Any:
    # zstd refuses raw dictionaries under 8 bytes; such a window is simply not used.
    return ZstdDict(prefix, is_raw=True).as_prefix if len(prefix) >= 8 else None


def encode_prefixed(raw: bytes, prefix: bytes, level: int = 19) -> bytes:
    """A zstd frame of ``raw`` that refers to ``prefix`` (``zstd --patch-from`` in memory)."""
    comp = ZstdCompressor(options={
        CompressionParameter.compression_level: level,
        CompressionParameter.window_log: _prefix_window_log(len(prefix), len(raw)),
        CompressionParameter.content_size_flag: 0,
        CompressionParameter.checksum_flag: 0,
        CompressionParameter.dict_id_flag: 0,
    }, zstd_dict=_as_prefix(prefix))
    return comp.compress(raw, ZstdCompressor.FLUSH_FRAME)


def decode_prefixed(payload: memoryview, prefix: bytes, out_size: int) -> bytes:
    """Inverse of :func:`encode_prefixed`, producing exactly ``out_size`` bytes.

    Raises:
        DeltaCorrupt, SizeExceeded: as :func:`decode_stream`.
    """
    try:
        dec = ZstdDecompressor(
            zstd_dict=_as_prefix(prefix),
            options={DecompressionParameter.window_log_max: _ZSTD_WINDOW_LOG_MAX})
        out: bytes = dec.decompress(bytes(payload), max_length=out_size + 1)
    except ZstdError as e:
        raise DeltaCorrupt(f"prefix chunk does not decompress: {e}") from e
    if len(out) > out_size:
        raise SizeExceeded("prefix chunk decodes to more than its out_size")
    if len(out) < out_size or not dec.eof:
        raise Truncated("prefix chunk decodes to fewer bytes than its out_size")
    if dec.unused_data:
        raise DeltaCorrupt("trailing bytes after a prefix chunk")
    return out


_POOL: ThreadPoolExecutor | None = None
_T = TypeVar("_T")
_PARALLEL_MIN = 64 << 10  # below this much compressed input, threads cost more than they save


def decode_all(jobs: Sequence[Callable[[], bytes]], sizes: Sequence[int],
               meanwhile: Callable[[], _T]) -> tuple[list[bytes], _T]:
    """Run a chunk's stream decodes (``jobs``), large ones on two threads, and ``meanwhile``.

    The decompressors and base reads (``os.pread``) release the GIL, so a chunk's values and
    run streams decode side by side while the calling thread runs ``meanwhile`` (the base
    window read). ``sizes`` are the compressed sizes, for scheduling only. Returns the decoded
    streams in order and ``meanwhile``'s result; ``meanwhile``'s error comes first, then the
    first failing job's in order.
    """
    global _POOL  # noqa: PLW0603 - one lazily made pool per process
    if sum(sizes) < _PARALLEL_MIN or (os.cpu_count() or 1) < 2:
        extra = meanwhile()
        return [job() for job in jobs], extra
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="delta-decode")
    # Largest first, so the two threads finish close together.
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
    futures = {i: _POOL.submit(jobs[i]) for i in order}
    try:
        extra = meanwhile()
    finally:
        # Every stream is waited for (even when ``meanwhile`` failed): none outlives the call.
        wait(futures.values())
    return [futures[i].result() for i in range(len(jobs))], extra
