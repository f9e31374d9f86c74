"""Build chunks: covers cut at chunk boundaries, streams coded, the smaller of patch and full.

Rules:
- Every chunk is coded on its own (no state crosses a chunk boundary), so a device can start
  or resume at any chunk and decode memory is bounded by the chunk size.
- A patch chunk that is not smaller than the plain compressed chunk is replaced by the full
  chunk (deltas can be larger than plain compression, e.g. on rewritten data).
- The encoder holds both images in memory; it runs on a build or controller host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from firmware_bundles.codec.chunk import MAX_CHUNK_OUT, Tag, planes, zigzag
from firmware_bundles.codec.matcher import Covers
from firmware_bundles.codec.streams import StreamOptions, encode_stream, put_uvarint

# Base ranges closer than this are read as one window (fewer reads on apply) while the
# chunk's total window stays within out_size + covered bytes.
_WINDOW_MERGE_GAP = 4096

FULL_OPTIONS = StreamOptions(lzma_x86=True)
DIFF_OPTIONS = StreamOptions(lzma_lclppb=((0, 0, 0), (3, 0, 0)))
LIT_OPTIONS = StreamOptions(lzma_x86=True)
CTRL_OPTIONS = StreamOptions(lzma_lclppb=((0, 0, 0),))


@dataclass(frozen=True)
class RawChunk:
    """One encoded chunk before it is handed out (bytes and the output size it decodes to)."""

    data: bytes
    out_size: int


def full_chunk(raw: bytes) -> bytes:
    """A FULL chunk of ``raw``."""
    return bytes((Tag.FULL,)) + encode_stream(raw, FULL_OPTIONS)


def _windows(old_pos: np.ndarray, length: np.ndarray, budget: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Sorted disjoint base ranges covering every cover; small gaps merged within budget."""
    order = np.argsort(old_pos, kind="stable")
    starts = old_pos[order]
    ends = starts + length[order]
    run_end = np.maximum.accumulate(ends)
    gap_to_prev = np.empty_like(starts)
    gap_to_prev[0] = 1
    gap_to_prev[1:] = starts[1:] - run_end[:-1]
    # Always merge overlapping or touching ranges; merge the smallest positive gaps while the
    # added bytes fit the budget.
    merge = gap_to_prev <= 0
    positive = np.flatnonzero((gap_to_prev > 0) & (gap_to_prev <= _WINDOW_MERGE_GAP))
    positive = positive[positive > 0]
    if len(positive):
        by_size = positive[np.argsort(gap_to_prev[positive], kind="stable")]
        fits = np.cumsum(gap_to_prev[by_size]) <= budget
        merge[by_size[fits]] = True
    merge[0] = False
    new_window = ~merge
    wid = np.cumsum(new_window) - 1
    wstart = starts[new_window]
    wend = np.maximum.reduceat(ends, np.flatnonzero(new_window))
    # wend: the run maximum matters when a later-starting range ends earlier.
    del wid
    return wstart, wend - wstart


def patch_chunk(old: np.ndarray, new: np.ndarray, c0: int, c1: int,
                covers: Covers) -> bytes:
    """A PATCH chunk for ``new[c0:c1]`` from the covers that fall in it (clipped)."""
    o, n, ln = covers.old_pos, covers.new_pos, covers.length
    lo = int(np.searchsorted(n + ln, c0, side="right"))
    hi = int(np.searchsorted(n, c1, side="left"))
    o, n, ln = o[lo:hi].copy(), n[lo:hi].copy(), ln[lo:hi].copy()
    # Clip the covers that straddle the chunk's edges.
    cut = np.maximum(c0 - n, 0)
    o += cut
    n += cut
    ln -= cut
    ln = np.minimum(ln, c1 - n)
    keep = ln > 0
    o, n, ln = o[keep], n[keep] - c0, ln[keep]
    out_size = c1 - c0
    chunk = new[c0:c1]
    ncov = len(ln)
    if ncov == 0:
        return b""
    covered = int(ln.sum())
    wstart, wlen = _windows(o, ln, out_size - covered + out_size // 2)
    wconcat = np.cumsum(wlen) - wlen
    wid = np.searchsorted(wstart, o, side="right") - 1
    wpos = wconcat[wid] + (o - wstart[wid])
    prev_end = np.concatenate(([0], (wpos + ln)[:-1]))
    wdelta = wpos - prev_end
    gaps = n - np.concatenate(([0], (n + ln)[:-1]))
    cum_excl = np.cumsum(ln) - ln
    ramp = np.arange(covered, dtype=np.int64)
    idx_new = np.repeat(n - cum_excl, ln) + ramp
    idx_old = np.repeat(o - cum_excl, ln) + ramp
    diff = (chunk[idx_new] - old[idx_old]).astype(np.uint8).tobytes()
    mask = np.ones(out_size, bool)
    mask[idx_new] = False
    lit = chunk[mask].tobytes()
    wgap = wstart - np.concatenate(([0], (wstart + wlen)[:-1]))
    head = bytearray((Tag.PATCH,))
    put_uvarint(head, len(wstart))
    put_uvarint(head, ncov)
    return b"".join((
        bytes(head),
        encode_stream(planes(wgap, 8) + planes(wlen, 4), CTRL_OPTIONS),
        encode_stream(planes(gaps, 4) + planes(ln, 4) + planes(zigzag(wdelta), 4),
                      CTRL_OPTIONS),
        encode_stream(diff, DIFF_OPTIONS),
        encode_stream(lit, LIT_OPTIONS),
    ))


def iter_full(data: bytes, chunk_out_size: int) -> Iterator[RawChunk]:
    """FULL chunks of ``data``."""
    _check_chunk_size(chunk_out_size)
    for c0 in range(0, len(data), chunk_out_size):
        raw = data[c0:c0 + chunk_out_size]
        yield RawChunk(full_chunk(raw), len(raw))


def iter_delta(old: bytes, new: bytes, covers: Covers,
               chunk_out_size: int) -> Iterator[RawChunk]:
    """PATCH chunks of ``new`` against ``old``, each replaced by FULL where that is smaller."""
    _check_chunk_size(chunk_out_size)
    old_arr = np.frombuffer(old, np.uint8)
    new_arr = np.frombuffer(new, np.uint8)
    for c0 in range(0, len(new), chunk_out_size):
        c1 = min(len(new), c0 + chunk_out_size)
        patch = patch_chunk(old_arr, new_arr, c0, c1, covers)
        full = full_chunk(new[c0:c1])
        best = patch if patch and len(patch) < len(full) else full
        yield RawChunk(best, c1 - c0)


def _check_chunk_size(chunk_out_size: int) -> None:
    if not 0 < chunk_out_size <= MAX_CHUNK_OUT:
        msg = f"chunk_out_size must be in 1..{MAX_CHUNK_OUT}"
        raise ValueError(msg)
