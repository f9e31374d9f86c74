"""Our own cover search (``_match.c``): libdivsufsort's suffix array, matched chunk by chunk.

The encoder's matcher where the C extension is built (``pip install -e .`` with a compiler):
about twice as fast as HDiffPatch's (``matcher.py``, the fallback), and a chunk's covers are
found on the chunk's own thread, so matching overlaps coding. Design, figures and what it gives
up: docs/delta-codec.md, "Our own matcher"; ``python -m bench.matcher_compare`` measures both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from firmware_bundles.codec.matcher import Covers, find_covers

try:
    from firmware_bundles.codec import _match
except ImportError:  # pragma: no cover - built without a compiler
    _match = None  # type: ignore[assignment]  # the optional extension is absent


def available() -> bool:
    """Whether the extension and ``pydivsufsort`` are both importable."""
    if _match is None:
        return False
    try:
        import pydivsufsort  # noqa: F401, PLC0415 - optional, encoder-side only
    except ImportError:
        return False
    return True


# An old image is split into this many parts (at most; parts are at least PART_MIN bytes),
# each with its own suffix array, built on its own thread: libdivsufsort is single-threaded,
# and the suffix array was most of the matching time (cryptography: 0.39 of 0.64 s). A match
# then cannot cross a part boundary (one more cover there) and each position is looked up once
# per part, so more parts cost more in the scan: on two cores, 3 or 4 parts were no faster on
# numpy and pydantic-core and 10-18 % slower on cryptography than 2.
PARTS = min(2, os.cpu_count() or 1)
PART_MIN = 2 << 20


class SuffixIndex:
    """The old image's suffix arrays and lookup tables, built once, shared by threads."""

    def __init__(self, old: bytes, parts: int | None = None) -> None:
        if _match is None:
            msg = "the _match extension is not built"
            raise RuntimeError(msg)
        import pydivsufsort  # noqa: PLC0415 - optional, encoder-side only

        self.old = old
        count = max(1, min(parts or PARTS, len(old) // PART_MIN))
        bounds = [len(old) * i // count for i in range(count + 1)]

        def part(i: int) -> tuple[np.ndarray, bytes]:
            lo, hi = bounds[i], bounds[i + 1]
            # 32-bit positions below 2 GiB (half the memory); the library switches on its own.
            sa = pydivsufsort.divsufsort(old[lo:hi]) if hi > lo else np.empty(0, np.int32)
            assert _match is not None  # checked above
            return sa, _match.build_index(old, sa, lo, hi - lo)

        if count == 1:
            self._parts = [part(0)]
        else:
            # libdivsufsort (through ctypes) and build_index release the GIL.
            with ThreadPoolExecutor(max_workers=count) as pool:
                self._parts = list(pool.map(part, range(count)))

    def covers(self, new: bytes, start: int = 0, end: int | None = None) -> Covers:
        """Covers of ``new[start:end]`` (releases the GIL while it searches)."""
        stop = len(new) if end is None else end
        assert _match is not None  # checked in __init__
        raw = _match.find_covers(self.old, new, self._parts, start, stop)
        v = np.frombuffer(raw, np.int64).reshape(-1, 3)
        return Covers(v[:, 0].copy(), v[:, 1].copy(), v[:, 2].copy())


def cover_source(old: bytes, new: bytes) -> Covers | Callable[[int, int], Covers]:
    """What the encoder matches with (``iter_delta`` takes either form).

    Our matcher, chunk by chunk, where it is available; else HDiffPatch's covers of the whole
    image.
    """
    if available():
        index = SuffixIndex(old)
        return lambda c0, c1: index.covers(new, c0, c1)
    return find_covers(old, new)
