r"""The ``.slb`` single-file bundle: layout, writer and a bounded streaming reader.

Layout (all integers big-endian)::

    offset 0   8 bytes  magic  89 53 4c 42 0d 0a 1a 0a  ("\x89SLB\r\n\x1a\n", PNG-style:
                                catches text-mode and 7-bit transfers)
           8   u16      format version (1)
          10   u16      flags (0; anything else is refused)
          12   u32      M = manifest envelope length, 1..MAX_MANIFEST
          16   M bytes  release manifest envelope (canonical JSON)
               u32      P = payload doc length, 0 (none) or 1..MAX_PAYLOAD_DOC
               P bytes  command-signed payload doc envelope (canonical JSON)
               chunks   in table order, each exactly its signed ``size``; then end of file

Rules:

* the reader takes the header in two bounded reads, hands the envelopes to the caller to verify
  **before** any chunk byte is read, then reads each chunk by exactly its signed size and checks
  its SHA-256 before yielding it;
* fewer bytes than the table promises is ``Truncated``; any byte after the last chunk is
  ``SizeExceeded``; nothing in the file is ever used as a path.

    reader = SlbReader(stream)
    header = reader.read_header()
    ... verify header.manifest / header.payload_doc ...
    for data in reader.iter_chunks(payload.chunks):
        ...
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from firmware_bundles.errors import (
    DigestMismatch,
    FormatInvalid,
    SchemaUnsupported,
    SizeExceeded,
    TransferError,
    Truncated,
)
from firmware_bundles.manifest import ChunkEntry

MAGIC = b"\x89SLB\r\n\x1a\n"
FORMAT_VERSION = 1
MAX_MANIFEST = 4 * 1024 * 1024
MAX_PAYLOAD_DOC = 4 * 1024 * 1024
_FIXED = struct.Struct(">8sHHI")
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class SlbHeader:
    """The unverified envelopes at the head of a ``.slb`` and where the chunks start."""

    manifest: bytes = field(repr=False)
    payload_doc: bytes | None = field(repr=False)
    chunks_offset: int


def check_chunk(entry: ChunkEntry, data: bytes) -> bytes:
    """Return ``data`` if it has the signed size and SHA-256 of ``entry``.

    Raises:
        SizeExceeded / Truncated: wrong length.
        DigestMismatch: wrong SHA-256.
    """
    if len(data) > entry.size:
        raise SizeExceeded(f"chunk of {len(data)} bytes, signed size {entry.size}")
    if len(data) < entry.size:
        raise Truncated(f"chunk of {len(data)} bytes, signed size {entry.size}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DigestMismatch("chunk does not match its signed sha256")
    return data


def encode_header(manifest: bytes, payload_doc: bytes | None = None) -> bytes:
    """The bytes of a ``.slb`` up to its first chunk."""
    if not 0 < len(manifest) <= MAX_MANIFEST:
        raise FormatInvalid(f"manifest envelope must be 1..{MAX_MANIFEST} bytes")
    doc = payload_doc or b""
    if len(doc) > MAX_PAYLOAD_DOC:
        raise FormatInvalid(f"payload doc must be at most {MAX_PAYLOAD_DOC} bytes")
    return b"".join(
        (_FIXED.pack(MAGIC, FORMAT_VERSION, 0, len(manifest)), manifest, _U32.pack(len(doc)), doc)
    )


def write_slb(
    out: BinaryIO, manifest: bytes, payload_doc: bytes | None, chunks: Iterable[bytes]
) -> int:
    """Write a complete ``.slb`` to ``out``; returns the number of bytes written."""
    header = encode_header(manifest, payload_doc)
    out.write(header)
    total = len(header)
    for data in chunks:
        out.write(data)
        total += len(data)
    return total


class SlbReader:
    """Reads one ``.slb`` from a stream, front to back, never past the signed sizes."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pos = 0
        self._header: SlbHeader | None = None
        self._done = False

    def _read_exact(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        left = n
        while left > 0:
            try:
                piece = self._stream.read(left)  # left is bounded by a signed size
            except OSError as e:
                raise TransferError(f"reading {what}: {e}") from e
            if not piece:
                raise Truncated(f"bundle ends inside {what} (offset {self._pos + n - left})")
            parts.append(piece)
            left -= len(piece)
        self._pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_header(self) -> SlbHeader:
        """Read magic, version, flags and both envelopes (at most ~8 MiB, bounded)."""
        if self._header is not None:
            raise RuntimeError("read_header called twice")
        magic, version, flags, m_len = _FIXED.unpack(self._read_exact(_FIXED.size, "header"))
        if magic != MAGIC:
            raise FormatInvalid("not a .slb bundle (bad magic)")
        if version != FORMAT_VERSION:
            raise SchemaUnsupported(f".slb format version {version} is not supported")
        if flags != 0:
            raise FormatInvalid(f".slb flags {flags:#x} are not supported")
        if not 0 < m_len <= MAX_MANIFEST:
            raise SizeExceeded(f"manifest length {m_len} outside 1..{MAX_MANIFEST}")
        manifest = self._read_exact(m_len, "manifest")
        (p_len,) = _U32.unpack(self._read_exact(_U32.size, "payload doc length"))
        if p_len > MAX_PAYLOAD_DOC:
            raise SizeExceeded(f"payload doc length {p_len} exceeds {MAX_PAYLOAD_DOC}")
        payload_doc = self._read_exact(p_len, "payload doc") if p_len else None
        self._header = SlbHeader(manifest, payload_doc, chunks_offset=self._pos)
        return self._header

    def iter_chunks(self, entries: Sequence[ChunkEntry]) -> Iterator[bytes]:
        """Yield each chunk's bytes after checking them against the (verified) table.

        The end-of-file check runs after the last chunk is yielded and consumed, so a caller
        that stops early never learns of trailing bytes: consume the iterator fully.

        Raises:
            RuntimeError: called before ``read_header`` or twice.
            Truncated / DigestMismatch / SizeExceeded: see ``check_chunk``, and trailing bytes.
        """
        if self._header is None or self._done:
            raise RuntimeError("iter_chunks needs read_header first and runs once")
        self._done = True
        for index, entry in enumerate(entries):
            data = self._read_exact(entry.size, f"chunk {index}")
            try:
                check_chunk(entry, data)
            except DigestMismatch:
                raise DigestMismatch(f"chunk {index} does not match its signed sha256") from None
            yield data
        try:
            extra = self._stream.read(1)
        except OSError as e:
            raise TransferError(f"reading past the last chunk: {e}") from e
        if extra:
            raise SizeExceeded("bytes after the last chunk")
