"""Find covers (approximate matches of new against old) with upstream HDiffPatch.

The encoder's fallback: it uses our own matcher (``sa_matcher.py``) where the C extension and
``pydivsufsort`` are present; ``bench/matcher_compare.py`` compares the two.

We call HDiffPatch's diff through the ``hdiffpatch`` package with no compression and read its
cover list out of the ``HDIFF13&`` container; everything else in its output (its RLE-coded diff
and literal streams) is thrown away, because our chunks code those themselves, per chunk.
HDiffPatch's matcher (suffix array plus approximate extension that tolerates a few differing
bytes per match, the bsdiff idea) is well kept C++, fast on zero-heavy images, and finds covers
whose byte-wise differences are mostly zeros.

Cover list layout (HDiffPatch ``compress_diff``, covers stream, no compression): per cover
``inc_oldPos`` (sign in the top bit), ``inc_newPos`` (literal bytes before it), ``length``;
numbers are HDiffPatch's big-endian 7-bit groups with a continuation bit. Old positions count
from the previous cover's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MAGIC = b"HDIFF13&"


@dataclass(frozen=True)
class Covers:
    """Covers sorted by new position, disjoint in new: ``new[n:n+l] ~ old[o:o+l]``."""

    old_pos: np.ndarray
    new_pos: np.ndarray
    length: np.ndarray


def _unpack(buf: bytes, pos: int, tag_bits: int = 0) -> tuple[int, int, int]:
    """HDiffPatch packUIntWithTag: returns (value, tag, next position)."""
    first = buf[pos]
    pos += 1
    tag = first >> (8 - tag_bits) if tag_bits else 0
    value = first & ((1 << (7 - tag_bits)) - 1)
    more = first & (1 << (7 - tag_bits))
    while more:
        byte = buf[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        more = byte & 0x80
    return value, tag, pos


def parse_hdiff_covers(diff: bytes) -> Covers:
    """Read the cover list of an uncompressed ``HDIFF13&`` diff.

    Raises:
        ValueError: the bytes are not an uncompressed HDIFF13 diff.
    """
    if not diff.startswith(_MAGIC):
        msg = "not an HDIFF13 diff"
        raise ValueError(msg)
    pos = diff.index(b"\0", len(_MAGIC))
    if pos != len(_MAGIC):
        msg = "compressed HDIFF13 diffs are not parsed"
        raise ValueError(msg)
    pos += 1
    head = []
    for _ in range(11):
        value, _tag, pos = _unpack(diff, pos)
        head.append(value)
    _new_size, _old_size, count, cover_size, compressed = head[:5]
    if compressed:
        msg = "compressed cover stream"
        raise ValueError(msg)
    end = pos + cover_size
    old_pos = np.empty(count, np.int64)
    new_pos = np.empty(count, np.int64)
    length = np.empty(count, np.int64)
    old_back = 0
    new_back = 0
    for i in range(count):
        inc_old, sign, pos = _unpack(diff, pos, 1)
        inc_new, _tag, pos = _unpack(diff, pos)
        n, _tag, pos = _unpack(diff, pos)
        o = old_back - inc_old if sign else old_back + inc_old
        new_back += inc_new
        old_pos[i] = o
        new_pos[i] = new_back
        length[i] = n
        old_back = o + n
        new_back += n
    if pos != end:
        msg = "cover stream length mismatch"
        raise ValueError(msg)
    return Covers(old_pos, new_pos, length)


def find_covers(old: bytes, new: bytes) -> Covers:
    """Covers of ``new`` against ``old`` (HDiffPatch's matcher, default match score)."""
    import hdiffpatch  # noqa: PLC0415 - encoder-only dependency, kept off the apply path

    if not old or not new:
        empty = np.empty(0, np.int64)
        return Covers(empty, empty, empty)
    diff = hdiffpatch.diff(old, new, None, validate=False, big_cache_match=True)
    return parse_hdiff_covers(diff)
