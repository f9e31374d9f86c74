"""Firmware images for runs: deterministic, firmware-like, two versions that differ a little.

Rules: the same seed gives the same bytes (so reports compare across runs); an image mixes
incompressible blocks (code, compressed assets), text-like blocks and zero runs, as a root
file system does; the next version rewrites ``change`` of its 4 KiB blocks and shifts one region,
so a delta is much smaller than the image but not trivial.

    old, new = make_images(size=2 << 20, change=0.05, seed=42)
"""

from __future__ import annotations

import numpy as np

BLOCK = 4096


def _image(size: int, rng: np.random.Generator) -> bytearray:
    blocks = -(-size // BLOCK)
    kinds = rng.choice(3, size=blocks, p=[0.5, 0.3, 0.2])  # random, text-like, zero
    out = bytearray(blocks * BLOCK)
    words = np.frombuffer(b"slotline firmware image config kernel module library ", dtype=np.uint8)
    for i, kind in enumerate(kinds):
        if kind == 0:
            out[i * BLOCK:(i + 1) * BLOCK] = rng.bytes(BLOCK)
        elif kind == 1:
            idx = rng.integers(0, len(words), size=BLOCK)
            out[i * BLOCK:(i + 1) * BLOCK] = words[idx].tobytes()
    del out[size:]
    return out


def make_images(size: int, change: float, seed: int) -> tuple[bytes, bytes]:
    """The ``from`` and ``to`` images of a run."""
    rng = np.random.default_rng(seed)
    old = _image(size, rng)
    new = bytearray(old)
    blocks = max(1, len(new) // BLOCK)
    for b in rng.choice(blocks, size=max(1, int(blocks * change)), replace=False):
        start = int(b) * BLOCK
        end = min(start + BLOCK, len(new))
        new[start:end] = rng.bytes(end - start)
    # An insertion shifts the tail a little, as a grown binary does (trimmed to keep the size).
    at = int(rng.integers(0, max(1, len(new) - 64)))
    new[at:at] = rng.bytes(37)
    del new[size:]
    # The version string lives in the image, so the two digests always differ.
    new[:16] = b"slotline-next-v\x00"
    return bytes(old), bytes(new)
