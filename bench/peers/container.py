"""A minimal chunk container for benchmarking our codec outside a bundle: per chunk
``out_size:u64 | length:u64 | data``. (Real bundles are .slb files made by the bundle layer;
their signatures and digests are not part of the codec's figures.)"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from firmware_bundles.delta import EncodedChunk

_HEAD = struct.Struct("<QQ")


def write_chunks(f: BinaryIO, chunks: Iterable[EncodedChunk]) -> None:
    for c in chunks:
        f.write(_HEAD.pack(c.out_size, len(c.data)))
        f.write(c.data)


def read_chunks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    while head := f.read(_HEAD.size):
        out_size, length = _HEAD.unpack(head)
        yield f.read(length), out_size


def overhead(n_chunks: int) -> int:
    """Bytes the container adds (excluded from the codec's size: a bundle has its own table)."""
    return n_chunks * _HEAD.size
