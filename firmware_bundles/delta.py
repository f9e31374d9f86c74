"""The delta codec: images to self-contained chunks and back, streaming, in bounded memory.

Rules:
- ``encode_full`` / ``encode_delta`` cut the new image into chunks of ``chunk_out_size`` output
  bytes (the last one shorter). Chunk *i* decodes from its own bytes plus random reads of the
  base image and yields exactly its ``out_size`` bytes of the new image at offset
  ``i * chunk_out_size``; so apply and transfer can resume at any chunk.
- Chunks are self-describing: the first byte is a format tag (``codec/chunk.py``).
  An empty image has no chunks.
- ``decode_chunk`` never yields more than ``out_size`` bytes, holds at most a few buffers of
  the chunk size (plus at most twice that of base windows), and raises a ``BundleRejected``
  subclass with a stable code on any inconsistency: ``DeltaCorrupt`` (bad structure, a delta
  chunk with no base or a base too short), ``SizeExceeded`` (declares or decodes to more than
  allowed), ``Truncated`` (ends early). A wrong base of the right size is caught by the bundle
  layer's base digest check before apply, and by the chunk/image digests after.
- ``decode_chunks`` decodes a run of chunks ahead on a 2-thread pool, outputs and refusals
  strictly in order, within a byte budget of in-flight decode memory (``codec/pipeline.py``).
- Encoding holds both images in memory (build or controller host). Covers come from our own
  matcher, chunk by chunk on the chunk's thread (``codec/sa_matcher.py``, libdivsufsort's
  suffix array and a C scan), or from HDiffPatch's (``codec/matcher.py``) where that is not
  built; each chunk is the smallest of a patch (covers, byte-wise
  diff, literals), a zstd coding with a base window as prefix, and a plain compressed chunk.
  ``docs/delta-codec.md`` has the format and the reasons.

Example:
    for chunk in encode_delta(old_path, new_path):
        table.append((chunk.out_size, sha256(chunk.data)))
    with FileBaseReader(old_path) as base:
        for piece in decode_chunk(chunk.data, chunk.out_size, base):
            out.write(piece)
        # or, a whole run decoded ahead on threads, within a memory budget:
        for image_part in decode_chunks(((c.data, c.out_size) for c in chunks), base):
            out.write(image_part)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, Self

from firmware_bundles.codec import chunk as _chunk
from firmware_bundles.codec import pipeline as _pipeline
from firmware_bundles.codec.chunk import MAX_CHUNK_OUT
from firmware_bundles.codec.pipeline import DEFAULT_BUDGET, DEFAULT_WORKERS
from firmware_bundles.errors import DeltaCorrupt

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_CHUNK_OUT",
    "BaseReader",
    "BytesBaseReader",
    "EncodedChunk",
    "FileBaseReader",
    "decode_chunk",
    "decode_chunks",
    "encode_delta",
    "encode_full",
]

# 4 MiB of output per chunk: large enough that per-chunk compression loses little context,
# small enough that a device decodes a chunk in a few tens of MiB.
DEFAULT_CHUNK = 4 << 20


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk: its bytes and the number of output bytes it decodes to."""

    data: bytes
    out_size: int


class BaseReader(Protocol):
    """Random reads of the base image a delta applies to."""

    size: int

    def pread(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``offset`` (fewer only at the end of the image)."""
        ...


class FileBaseReader:
    """A base image in a file, read with ``os.pread`` (no shared file position)."""

    def __init__(self, source: Path | str | BinaryIO) -> None:
        if isinstance(source, (str, Path)):
            self._file: BinaryIO = Path(source).open("rb")  # noqa: SIM115 - closed by close()
            self._owned = True
        else:
            self._file = source
            self._owned = False
        self._fd = self._file.fileno()
        self.size = os.fstat(self._fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (short only at end of file)."""
        if offset < 0 or length < 0:
            raise DeltaCorrupt("negative base read")
        parts = []
        while length > 0:
            piece = os.pread(self._fd, length, offset)
            if not piece:
                break
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(parts)

    def close(self) -> None:
        """Close the file if this reader opened it."""
        if self._owned:
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class BytesBaseReader:
    """A base image already in memory (tests, small images)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        """Return ``data[offset:offset+length]``."""
        if offset < 0 or length < 0:
            raise DeltaCorrupt("negative base read")
        return self._data[offset:offset + length]


def encode_full(new: Path, *, chunk_out_size: int = DEFAULT_CHUNK) -> Iterator[EncodedChunk]:
    """Chunks of ``new`` that need no base (a full bundle).

    Raises:
        ValueError: ``chunk_out_size`` outside 1..MAX_CHUNK_OUT.
    """
    from firmware_bundles.codec import encoder as _encoder  # noqa: PLC0415 - numpy: encoder only

    data = Path(new).read_bytes()
    for c in _encoder.iter_full(data, chunk_out_size):
        yield EncodedChunk(c.data, c.out_size)


def encode_delta(old: Path, new: Path, *,
                 chunk_out_size: int = DEFAULT_CHUNK) -> Iterator[EncodedChunk]:
    """Chunks of ``new`` that decode against the exact bytes of ``old``.

    Raises:
        ValueError: ``chunk_out_size`` outside 1..MAX_CHUNK_OUT.
    """
    from firmware_bundles.codec import encoder as _encoder  # noqa: PLC0415 - numpy: encoder only
    from firmware_bundles.codec import sa_matcher  # noqa: PLC0415 - encoder only

    if not 0 < chunk_out_size <= MAX_CHUNK_OUT:
        msg = f"chunk_out_size must be in 1..{MAX_CHUNK_OUT}"
        raise ValueError(msg)
    old_data = Path(old).read_bytes()
    new_data = Path(new).read_bytes()
    for c in _encoder.iter_delta(old_data, new_data, sa_matcher.cover_source(old_data, new_data),
                                 chunk_out_size):
        yield EncodedChunk(c.data, c.out_size)


def decode_chunk(data: bytes, out_size: int, base: BaseReader | None) -> Iterator[bytes]:
    """Decode one chunk; yields pieces that add up to exactly ``out_size`` bytes.

    Args:
        data: the chunk's bytes (already digest-checked by the bundle layer).
        out_size: the signed output size of this chunk.
        base: the base image for delta chunks; ``None`` for a full bundle.

    Raises:
        DeltaCorrupt: bad structure, a delta chunk without a base, or a base too short.
        SizeExceeded: the chunk declares or decodes to more than allowed.
        Truncated: the chunk ends early.
    """
    return _chunk.decode_chunk(data, out_size, base)


def decode_chunks(chunks: Iterable[tuple[bytes, int]], base: BaseReader | None, *,
                  budget: int = DEFAULT_BUDGET, workers: int = DEFAULT_WORKERS) -> Iterator[bytes]:
    """Decode a run of chunks, later ones on threads while earlier ones are written.

    Yields each chunk's output (exactly its ``out_size`` bytes) strictly in order. Chunks in
    flight are charged an upper bound of their decode memory and held within ``budget``
    (``codec/pipeline.py``). Close the iterator (or let it end) to end its threads.

    Args:
        chunks: ``(data, out_size)`` per chunk, digest-checked; pulled on the caller's thread.
        base: the base image (concurrent ``pread`` must be safe), ``None`` for a full bundle.
        budget: bytes charged to chunks in flight; the oldest chunk is always admitted.
        workers: decoding threads; 0 decodes serially on the caller's thread.

    Raises:
        DeltaCorrupt, SizeExceeded, Truncated: as :func:`decode_chunk`, for the first bad
            chunk, only after every chunk before it was yielded; nothing after it is yielded.
        Whatever ``chunks`` raises, at the position where it raised.
    """
    return _pipeline.decode_chunks(chunks, base, budget=budget, workers=workers)
