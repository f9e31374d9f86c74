"""Synthetic old/new image pairs of any size, for the apply-memory check of bench/delta_bench.py.

An image is 4 KiB blocks: about half zero (free space), the rest random (file data). The new
image keeps most of the old one but shifts it (blocks inserted), changes a few bytes in many
places (like relinked code) and rewrites a few regions, so a delta has covers, diffs and
literals everywhere. Deterministic for a size (seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BLOCK = 4096
SEGMENT = 1 << 20


def _image(rng: np.random.Generator, size: int) -> np.ndarray:
    blocks = size // BLOCK
    data = rng.integers(0, 256, size=size, dtype=np.uint8)
    zero = rng.random(blocks) < 0.5
    data.reshape(blocks, BLOCK)[zero] = 0
    return data


def synthetic_pair(work: Path, size: int, seed: int = 7) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed + size)
    old = _image(rng, size)
    old_path = work / f"synth-{size >> 20}MiB-old.img"
    new_path = work / f"synth-{size >> 20}MiB-new.img"
    old.tofile(old_path)
    with new_path.open("wb") as f:
        written = 0
        for start in range(0, size, SEGMENT):
            seg = old[start:start + SEGMENT].copy()
            if rng.random() < 0.02:  # a rewritten region
                seg = rng.integers(0, 256, size=len(seg), dtype=np.uint8)
            else:  # a few changed bytes per 4 KiB of data (relinked code, new timestamps)
                pos = rng.integers(0, len(seg), size=len(seg) // BLOCK)
                seg[pos] += rng.integers(1, 256, size=len(pos), dtype=np.uint8)
            if rng.random() < 0.1:  # inserted bytes shift everything after them
                f.write(rng.integers(0, 256, size=int(rng.integers(1, BLOCK)),
                                     dtype=np.uint8).tobytes())
            piece = seg.tobytes()[: size - written]
            f.write(piece)
            written += len(piece)
            if written >= size:
                break
        f.truncate(size)
    return old_path, new_path


if __name__ == "__main__":
    import sys

    old_path, new_path = synthetic_pair(Path(sys.argv[1]), int(sys.argv[2]))
    print(old_path, new_path)
