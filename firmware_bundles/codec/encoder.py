"""Build chunks: covers cut at chunk boundaries, streams coded, the smallest chunk kind kept.

Rules:
- Every chunk is coded on its own (no state crosses a chunk boundary), so a device can start
  or resume at any chunk and decode memory is bounded by the chunk size.
- A patch chunk is replaced by a prefix or full chunk where that is smaller (deltas can be
  larger than plain compression, e.g. on rewritten data).
- The encoder holds both images in memory; it runs on a build or controller host.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from firmware_bundles.codec.chunk import MAX_CHUNK_OUT, Tag, planes, zigzag
from firmware_bundles.codec.matcher import Covers
from firmware_bundles.codec.streams import (
    STRONG_GAIN_BOUND,
    StreamOptions,
    ZstdCompressor,
    encode_prefixed,
    encode_stream,
    lzma_variants,
    put_uvarint,
)

try:  # encoder-side C helpers; numpy versions below where the extension is not built
    from firmware_bundles.codec import _match as _native
except ImportError:  # pragma: no cover - built without a compiler
    _native = None  # type: ignore[assignment]  # the optional extension is absent

# Base ranges closer than this are read as one window (fewer reads on apply) while the
# chunk's total window stays within out_size + covered bytes.
_WINDOW_MERGE_GAP = 4096

FULL_OPTIONS = StreamOptions(lzma_x86=True)
RUN_OPTIONS = StreamOptions(lzma_lclppb=((0, 0, 0), (3, 0, 0)))
VALUE_OPTIONS = StreamOptions(lzma_lclppb=((0, 0, 0),))
# The coarse coding's values are the one slow stream (LZMA's match finder in short zero runs,
# 1.5 MB/s): from 512 KiB they are coded in two parts on two threads (+0.2 % on 1.6-3.6 MB
# streams, +2 % on 0.6 MB ones; half the wall time, and the decoder splits them too).
COARSE_VALUE_OPTIONS = StreamOptions(lzma_lclppb=((0, 0, 0),), parts_min=512 << 10)
# Zero runs at least this long are split out of the diff in the coarse coding.
COARSE_ZERO_RUN = 512
TRIAL_OPTIONS = StreamOptions(lzma_lclppb=((0, 0, 0),), lzma_preset=1, zstd_max_raw=0)
COARSE_TRIAL_MARGIN = 1.1  # see patch_chunk
# Start the prefix candidate early (beside the patch, on an idle core) where at least this
# share of the chunk is literals: literals are the part a patch codes no better than plain
# compression, so such a patch is likely to come out above half of a zstd-3 coding.
SPECULATE_LITERALS = 1 / 8
LIT_OPTIONS = StreamOptions(lzma_x86=True)
CTRL_OPTIONS = StreamOptions(lzma_lclppb=((0, 0, 0),))


# The covers of new[c0:c1] (a per-chunk matcher, see iter_delta).
CoverSource = Callable[[int, int], Covers]


@dataclass(frozen=True)
class RawChunk:
    """One encoded chunk before it is handed out (bytes and the output size it decodes to)."""

    data: bytes
    out_size: int


def full_chunk(raw: bytes, to_beat: int | None = None) -> bytes | None:
    """A FULL chunk of ``raw``; ``None`` where it could not be smaller than ``to_beat`` bytes.

    The full-strength coding costs seconds per chunk; a preset-1 trial (which also picks BCJ
    or not) bounds what it can reach (``STRONG_GAIN_BOUND``), so it is skipped where even that
    bound loses, e.g. where a prefix chunk already found most of the chunk in the base.
    """
    variants, trial = lzma_variants(raw, FULL_OPTIONS)
    if to_beat is not None and trial >= 0 and trial * STRONG_GAIN_BOUND >= to_beat:
        return None
    return bytes((Tag.FULL,)) + encode_stream(raw, FULL_OPTIONS, variants)


def prefix_chunk(old: bytes, covers: Covers, c0: int, c1: int, raw: bytes) -> bytes:
    """A PREFIX chunk: ``raw`` zstd-coded against a window of the base (at most 2x its size).

    The window is centred on where the chunk's covers point into the base, or on the same
    offset when there are none.
    """
    out_size = c1 - c0
    limit = 2 * out_size
    n, ln = covers.new_pos, covers.length
    lo_i = int(np.searchsorted(n + ln, c0, side="right"))
    hi_i = int(np.searchsorted(n, c1, side="left"))
    if hi_i > lo_i:
        centre = int(np.median(covers.old_pos[lo_i:hi_i] - (covers.new_pos[lo_i:hi_i] - c0)))
        centre += out_size // 2
    else:
        centre = c0 + out_size // 2
    start = max(0, min(len(old) - limit, centre - limit // 2))
    start = max(0, start)
    window = old[start:start + limit]
    head = bytearray((Tag.PREFIX,))
    put_uvarint(head, start)
    put_uvarint(head, len(window))
    return bytes(head) + encode_prefixed(raw, window)


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
    wstart = starts[new_window]
    # The maximum, not the last end: a later-starting range can end earlier.
    wend = np.maximum.reduceat(ends, np.flatnonzero(new_window))
    return wstart, wend - wstart


def patch_chunk(old: np.ndarray, new: np.ndarray, c0: int, c1: int,
                covers: Covers, *, aux: Executor | None = None) -> bytes:
    """A PATCH chunk for ``new[c0:c1]`` from the covers that fall in it (clipped).

    With ``aux``, the literal and cover streams are coded there while this thread codes the
    diff (the compressors release the GIL), so one chunk can use two cores.
    """
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
    diff, lit = _split(old, chunk, o, n, ln)
    wgap = wstart - np.concatenate(([0], (wstart + wlen)[:-1]))

    def side_streams() -> bytes:
        return b"".join((
            encode_stream(planes(wgap, 8) + planes(wlen, 4), CTRL_OPTIONS),
            encode_stream(planes(gaps, 4) + planes(ln, 4) + planes(zigzag(wdelta), 4),
                          CTRL_OPTIONS),
        ))

    side = aux.submit(side_streams) if aux is not None else None
    lit_future = aux.submit(encode_stream, lit, LIT_OPTIONS) if aux is not None else None
    # Two codings of the diff, the smaller wins: fine runs (every zero run split out: best
    # when changes are sparse) and coarse runs (only long zero runs split out: the coder then
    # sees the spacing of changes, e.g. pointer tables, in context). The coarse one costs up to
    # seconds per chunk at full strength (LZMA's match finder walking short zero runs; the fine
    # one a tenth of that), so a fast trial of both (preset 1) decides which one is coded at
    # full strength: the coarse one only where its trial is within COARSE_TRIAL_MARGIN of the
    # fine one's. Fast trials favour the fine coding (the long-match search is what makes the
    # coarse one small). Measured per chunk on the corpus (both coded at full strength, our
    # matcher, 2 Dec 2026): trial ratio under 1.1, the coarse coding won by 1.6-20 % in all but
    # one chunk (-0.9 %); from 1.1 to 1.2 it won by -2.2 % to +7.5 % (median 0.3 %) for 0.3-2.8
    # CPU s a chunk; above 1.2 it lost, by up to 61 %. 1.2 to 1.1 cost duckdb 1.1 % and
    # cryptography 0.2 % of size and cut their encode by 36 % and 43 %.
    fine_runs = diff_runs(diff, 1)
    best = None
    if fine_runs[0] > 1:
        coarse_runs = diff_runs(diff, COARSE_ZERO_RUN)
        fine_trial_job = aux.submit(_encode_runs, fine_runs, TRIAL_OPTIONS, TRIAL_OPTIONS) \
            if aux is not None else None
        coarse_trial = _encode_runs(coarse_runs, TRIAL_OPTIONS, TRIAL_OPTIONS)
        fine_trial = fine_trial_job.result() if fine_trial_job is not None else \
            _encode_runs(fine_runs, TRIAL_OPTIONS, TRIAL_OPTIONS)
        if len(coarse_trial[1]) < COARSE_TRIAL_MARGIN * len(fine_trial[1]):
            best = _encode_runs(coarse_runs, RUN_OPTIONS, COARSE_VALUE_OPTIONS, aux)
    if best is None:
        best = _encode_runs(fine_runs, RUN_OPTIONS, VALUE_OPTIONS, aux)
    head = bytearray((Tag.PATCH,))
    put_uvarint(head, len(wstart))
    put_uvarint(head, ncov)
    put_uvarint(head, best[0])
    return b"".join((
        bytes(head),
        side.result() if side is not None else side_streams(),
        best[1],
        lit_future.result() if lit_future is not None else encode_stream(lit, LIT_OPTIONS),
    ))


def _encode_runs(runs: Runs, run_opts: StreamOptions, value_opts: StreamOptions,
                 aux: Executor | None = None) -> tuple[int, bytes]:
    """(run count, the three diff streams) of one run-length split.

    With ``aux``, the two run-length streams are coded there beside the values.
    """
    nrun, zruns, nzruns, values = runs
    if aux is None:
        return nrun, b"".join((encode_stream(zruns, run_opts), encode_stream(nzruns, run_opts),
                               encode_stream(values, value_opts)))
    z = aux.submit(encode_stream, zruns, run_opts)
    nz = aux.submit(encode_stream, nzruns, run_opts)
    v = encode_stream(values, value_opts)
    return nrun, b"".join((z.result(), nz.result(), v))


# A run-length split of a chunk's differences: run count, zero-run and value-run lengths (as
# unsigned LEB128), the values.
Runs = tuple[int, bytes, bytes, bytes]


def _split(old: np.ndarray, chunk: np.ndarray, o: np.ndarray, n: np.ndarray,
           ln: np.ndarray) -> tuple[bytes, bytes]:
    """(differences over the covered bytes, in order; the other bytes as literals).

    ``n`` is relative to the chunk. The C version is ~10x faster and needs no index arrays
    (the numpy one builds two of 8 bytes per covered byte).
    """
    if _native is not None:
        diff, lit = _native.split_chunk(old, chunk, o, n, ln)
        return diff, lit
    covered = int(ln.sum())
    cum_excl = np.cumsum(ln) - ln
    ramp = np.arange(covered, dtype=np.int64)
    idx_new = np.repeat(n - cum_excl, ln) + ramp
    idx_old = np.repeat(o - cum_excl, ln) + ramp
    diff = (chunk[idx_new] - old[idx_old]).astype(np.uint8)
    mask = np.ones(len(chunk), bool)
    mask[idx_new] = False
    return diff.tobytes(), chunk[mask].tobytes()


def diff_runs(diff: bytes, min_zero_run: int) -> Runs:
    """Run-length split of ``diff`` (see ``_diff_runs``), in C where the extension is built."""
    if _native is not None:
        nrun, zruns, nzruns, values = _native.diff_runs(diff, min_zero_run)
        return nrun, zruns, nzruns, values
    z, nz, values = _diff_runs(np.frombuffer(diff, np.uint8), min_zero_run)
    return len(z), uvarints(z), uvarints(nz), values


def _diff_runs(diff: np.ndarray, min_zero_run: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Run-length split of the diff: zero-run lengths, value-run lengths, the values.

    Zero runs shorter than ``min_zero_run`` between two value runs stay inside a value run.
    """
    nonzero = diff != 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.view(np.int8), [0]))))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) and min_zero_run > 1:
        keep = np.concatenate(([True], (starts[1:] - ends[:-1]) >= min_zero_run))
        last = np.concatenate((np.flatnonzero(keep)[1:] - 1, [len(ends) - 1]))
        starts, ends = starts[keep], ends[last]
    zruns = starts - np.concatenate(([0], ends[:-1]))
    # Starts are distinct and so are ends (a zero run separates runs), so plain fancy
    # indexing marks them (np.add.at is several times slower); the running sum is 0 or 1.
    inside = np.zeros(len(diff) + 1, np.int8)
    inside[starts] += 1
    inside[ends] -= 1
    values = diff[np.cumsum(inside[:-1], dtype=np.int8).view(bool)].tobytes()
    return zruns, ends - starts, values


def uvarints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value, concatenated (vectorised)."""
    v = np.asarray(values, dtype=np.uint64)
    if len(v) == 0:
        return b""
    nbytes = np.ones(len(v), np.int64)
    for group in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * group))
    total = int(nbytes.sum())
    vid = np.repeat(np.arange(len(v)), nbytes)
    first = np.cumsum(nbytes) - nbytes
    k = np.arange(total) - first[vid]
    out = ((v[vid] >> (k * 7).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    out[k < nbytes[vid] - 1] |= 0x80
    return bytes(out.tobytes())


def iter_full(data: bytes, chunk_out_size: int) -> Iterator[RawChunk]:
    """FULL chunks of ``data``."""
    _check_chunk_size(chunk_out_size)
    for c0 in range(0, len(data), chunk_out_size):
        raw = data[c0:c0 + chunk_out_size]
        chunk = full_chunk(raw)
        assert chunk is not None  # no bound given, so always coded
        yield RawChunk(chunk, len(raw))


def iter_delta(old: bytes, new: bytes, covers: Covers | CoverSource, chunk_out_size: int,
               workers: int | None = None) -> Iterator[RawChunk]:
    """PATCH chunks of ``new`` against ``old``, each replaced by FULL where that is smaller.

    ``covers`` is either one cover list for the whole image or a function giving the covers
    of ``new[c0:c1]`` (a matcher that works chunk by chunk, called on the chunk's thread).
    Chunks are independent, so they are coded on ``workers`` threads (the compressors, the
    matcher and most numpy work release the GIL) and yielded in order, with a bounded number
    in flight.
    """
    _check_chunk_size(chunk_out_size)
    old_arr = np.frombuffer(old, np.uint8)
    new_arr = np.frombuffer(new, np.uint8)

    starts = list(range(0, len(new), chunk_out_size))
    source = covers if callable(covers) else lambda _c0, _c1: covers
    cores = os.cpu_count() or 1
    # One chunk more than there are cores: a chunk's coding has serial stretches (matching,
    # the trials, one long LZMA stream) that another chunk's work fills.
    n_workers = workers or min(cores + 1, 5)
    # With fewer chunks than workers a core would idle: the prefix candidate (which needs
    # no patch) is then started beside the patch instead of after it where the patch looks
    # poor from its covers alone (SPECULATE_LITERALS of the chunk or more left uncovered).
    # This only moves work earlier: which candidates are compared, and so the output, is
    # the same either way; a wrong guess costs one prefix coding on an otherwise idle core.
    idle_core = len(starts) < min(n_workers, cores)

    def one(c0: int) -> RawChunk:
        c1 = min(len(new), c0 + chunk_out_size)
        covers = source(c0, c1)
        raw = new[c0:c1]
        early = None
        if idle_core and _uncovered(covers, c0, c1) >= SPECULATE_LITERALS * (c1 - c0):
            early = aux.submit(prefix_chunk, old, covers, c0, c1, raw)
        estimate_job = aux.submit(quick_estimate, raw)
        patch = patch_chunk(old_arr, new_arr, c0, c1, covers, aux=aux)
        # The strong full and prefix codings cost seconds per chunk; a level-3 zstd estimate
        # tells when they cannot win (strong coders gain well under 2x over level 3; a patch
        # that small leaves a prefix coding little to find).
        estimate = len(estimate_job.result())
        candidates = [patch] if patch else []
        if not patch or len(patch) * 2 > estimate:
            candidates.append(early.result() if early is not None
                              else prefix_chunk(old, covers, c0, c1, raw))
            full = full_chunk(raw, min(len(c) for c in candidates))
            if full is not None:
                candidates.append(full)
        elif early is not None:
            early.cancel()
        return RawChunk(min(candidates, key=len), c1 - c0)

    # Chunk workers plus as many helpers for their side streams (see patch_chunk).
    with ThreadPoolExecutor(max_workers=n_workers) as pool, \
            ThreadPoolExecutor(max_workers=n_workers) as aux:
        pending: deque[Future[RawChunk]] = deque()
        for c0 in starts:
            pending.append(pool.submit(one, c0))
            if len(pending) > n_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _uncovered(covers: Covers, c0: int, c1: int) -> int:
    """Bytes of ``new[c0:c1]`` outside every cover (the patch's literals)."""
    n, ln = covers.new_pos, covers.length
    lo = int(np.searchsorted(n + ln, c0, side="right"))
    hi = int(np.searchsorted(n, c1, side="left"))
    starts = np.maximum(n[lo:hi], c0)
    ends = np.minimum(n[lo:hi] + ln[lo:hi], c1)
    return (c1 - c0) - int(np.maximum(ends - starts, 0).sum())


def quick_estimate(raw: bytes) -> bytes:
    """A fast zstd coding of ``raw`` (used only to decide what is worth trying)."""
    return ZstdCompressor(level=3).compress(raw, ZstdCompressor.FLUSH_FRAME)


def _check_chunk_size(chunk_out_size: int) -> None:
    if not 0 < chunk_out_size <= MAX_CHUNK_OUT:
        msg = f"chunk_out_size must be in 1..{MAX_CHUNK_OUT}"
        raise ValueError(msg)
