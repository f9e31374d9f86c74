"""Cover search: HDiffPatch's matcher (the encoder's) against our own (``codec/sa_matcher.py``).

    python -m bench.matcher_compare [--corpus DIR] [--pairs cryptography duckdb ...]

Per pair, in one process, one after the other: the time each matcher takes to find the covers
of the whole new image (ours: suffix array, index, then the chunks matched on two threads),
and the size of the delta our chunk coder makes from each cover list (same coder, same
chunks), checked by decoding. Prints a Markdown table; raw figures go to
.bench-out/matcher-results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.delta_bench import ROOT, WORK, corpus_pairs
from firmware_bundles.codec import encoder, matcher, sa_matcher
from firmware_bundles.codec.chunk import decode_chunk
from firmware_bundles.codec.matcher import Covers
from firmware_bundles.delta import DEFAULT_CHUNK, BytesBaseReader


def _delta_size(old: bytes, new: bytes, covers: Covers) -> tuple[int, float]:
    """Size of the delta coded from ``covers`` and the coding time; the decode is checked."""
    t = time.perf_counter()
    chunks = list(encoder.iter_delta(old, new, covers, DEFAULT_CHUNK))
    seconds = time.perf_counter() - t
    base = BytesBaseReader(old)
    at = 0
    for c in chunks:
        out = b"".join(decode_chunk(c.data, c.out_size, base))
        if out != new[at:at + c.out_size]:
            msg = "delta does not decode to the new image"
            raise SystemExit(msg)
        at += c.out_size
    return sum(len(c.data) for c in chunks), seconds


def _concat(parts: list[Covers]) -> Covers:
    """One cover list from per-chunk lists given in new-image order."""
    if not parts:
        empty = np.empty(0, np.int64)
        return Covers(empty, empty, empty)
    return Covers(np.concatenate([p.old_pos for p in parts]),
                  np.concatenate([p.new_pos for p in parts]),
                  np.concatenate([p.length for p in parts]))


def _ours(old: bytes, new: bytes) -> tuple[Covers, dict[str, float]]:
    t0 = time.perf_counter()
    index = sa_matcher.SuffixIndex(old)
    t1 = time.perf_counter()
    starts = range(0, len(new), DEFAULT_CHUNK)
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(
            lambda s: index.covers(new, s, min(len(new), s + DEFAULT_CHUNK)), starts))
    t2 = time.perf_counter()
    return _concat(parts), {"index_s": t1 - t0, "scan_s": t2 - t1,
                                      "total_s": t2 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / ".corpus-cache" / "pairs")
    ap.add_argument("--pairs", nargs="*")
    args = ap.parse_args()
    if not sa_matcher.available():
        msg = "needs the _match extension and pydivsufsort (pip install -e '.[bench]')"
        raise SystemExit(msg)
    rows = []
    print("| pair | HDiffPatch matcher s | ours s (index + scan) | delta from HDiffPatch's "
          "covers | delta from ours | ours/HDiffPatch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, old_p, new_p in corpus_pairs(args.corpus):
        if args.pairs and name not in args.pairs:
            continue
        old, new = old_p.read_bytes(), new_p.read_bytes()
        t = time.perf_counter()
        theirs = matcher.find_covers(old, new)
        hdp_s = time.perf_counter() - t
        ours, times = _ours(old, new)
        hdp_size, _ = _delta_size(old, new, theirs)
        our_size, _ = _delta_size(old, new, ours)
        row = {"pair": name, "hdiffpatch_s": hdp_s, **times, "hdiffpatch_covers": len(
            theirs.length), "our_covers": len(ours.length), "size_from_hdiffpatch": hdp_size,
            "size_from_ours": our_size}
        rows.append(row)
        print(f"| {name} | {hdp_s:.2f} | {times['total_s']:.2f} ({times['index_s']:.2f} + "
              f"{times['scan_s']:.2f}) | {hdp_size:,} | {our_size:,} | "
              f"{our_size / hdp_size:.3f} |", flush=True)
    WORK.mkdir(exist_ok=True)
    (WORK / "matcher-results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
