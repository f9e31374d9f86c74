"""A content-addressed chunk store: ``root/ab/abcdef...`` named by the chunk's SHA-256.

Used by the controller (every release's chunks) and site relays (a cache of what the site
fetched). Rules:

* a chunk's name is its lowercase hex SHA-256, checked against a strict pattern before it is
  turned into a path (no name from outside ever reaches the file system unchecked);
* ``put`` hashes the bytes and refuses them if they do not match the expected digest; it writes a
  temporary file in the same directory, fsyncs, renames and fsyncs the directory, so a crash
  leaves either the whole chunk or nothing under its name;
* ``get`` re-hashes what it read (a disk can rot, a relay's disk is not trusted) and, on a
  mismatch, deletes the bad file and raises ``DigestMismatch`` so the caller refetches;
* the store keeps a running byte count (``usage``), computed once at open;
* ``get`` reads a chunk with one ``read`` of the file's ``fstat`` size (a ``read(max + 1)``
  allocated a 4 MiB buffer per 64 KiB chunk); a file larger than ``max_chunk_size`` is refused;
* with ``cache_bytes > 0`` the store keeps recently read chunks in an LRU bounded in bytes,
  keyed by digest, filled only with bytes that were just verified against their name (a hit is
  served without reading or hashing the file again; ``remove`` evicts). The key is the content's
  own digest, so a hit can never be another chunk's bytes; deciding *which* digest a caller may
  read (authorization) stays with the caller.

    store = ChunkStore(Path("/var/lib/slotline/chunks"))
    digest = store.put(data)
    assert store.get(digest) == data
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from firmware_bundles.durable import fsync_dir
from firmware_bundles.errors import DigestMismatch, FormatInvalid, SizeExceeded, TransferError
from firmware_bundles.keys import is_hex_digest
from firmware_bundles.manifest import MAX_CHUNK_SIZE


class ChunkStore:
    """Chunks on disk by SHA-256; safe for several threads of one process."""

    def __init__(
        self, root: Path, *, max_chunk_size: int = MAX_CHUNK_SIZE, cache_bytes: int = 0
    ) -> None:
        self.root = Path(root)
        self.max_chunk_size = max_chunk_size
        self.cache_bytes = max(0, cache_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0  # bytes held by ``_cache``
        self.cache_hits = 0
        self.cache_misses = 0
        self._usage = sum(p.stat().st_size for p in self._files())
        self._count = sum(1 for _ in self._files())

    def _files(self) -> Iterator[Path]:
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                yield from (p for p in sub.iterdir() if is_hex_digest(p.name))

    def path(self, digest: str) -> Path:
        """Where the chunk named ``digest`` lives (the digest is validated first)."""
        if not is_hex_digest(digest):
            raise FormatInvalid("a chunk name is 64 lowercase hex characters")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        """Whether a chunk with this name is stored (not re-verified)."""
        return self.path(digest).is_file()

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` and return its SHA-256.

        Args:
            data: the chunk bytes.
            digest: the expected SHA-256, if known (a fetched chunk): refused on mismatch.

        Raises:
            DigestMismatch: ``data`` does not hash to ``digest``.
            SizeExceeded: larger than ``max_chunk_size``.
            TransferError: the disk write failed.
        """
        if len(data) > self.max_chunk_size:
            raise SizeExceeded(f"chunk of {len(data)} bytes exceeds {self.max_chunk_size}")
        actual = hashlib.sha256(data).hexdigest()
        if digest is not None and actual != digest:
            raise DigestMismatch("chunk does not match the digest it was stored under")
        target = self.path(actual)
        if target.is_file():
            return actual
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                existed = target.exists()
                Path(tmp).replace(target)
                if not existed:
                    self._usage += len(data)
                    self._count += 1
            fsync_dir(target.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise TransferError(f"storing chunk {actual[:16]}: {e}") from e
        return actual

    def get(self, digest: str) -> bytes:
        """Read and re-verify a chunk.

        Raises:
            KeyError: no such chunk.
            DigestMismatch: the stored bytes rotted (the file is removed).
        """
        path = self.path(digest)
        if self.cache_bytes:
            with self._lock:
                hit = self._cache.get(digest)
                if hit is not None:
                    self._cache.move_to_end(digest)
                    self.cache_hits += 1
                    return hit
                self.cache_misses += 1
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read(size) if size <= self.max_chunk_size else b""
        except FileNotFoundError:
            raise KeyError(digest) from None
        if (
            size > self.max_chunk_size
            or len(data) != size
            or hashlib.sha256(data).hexdigest() != digest
        ):
            self.remove(digest)
            raise DigestMismatch(f"stored chunk {digest[:16]} is corrupt; removed")
        if self.cache_bytes:
            self._remember(digest, data)
        return data

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        with self._lock:
            if digest in self._cache:
                return
            self._cache[digest] = data
            self._cached += len(data)
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)

    def _forget(self, digest: str) -> None:
        # Caller holds ``_lock``.
        old = self._cache.pop(digest, None)
        if old is not None:
            self._cached -= len(old)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the verified-chunk cache (at most ``cache_bytes``)."""
        return self._cached

    def remove(self, digest: str) -> bool:
        """Delete a chunk; returns whether it existed."""
        path = self.path(digest)
        with self._lock:
            self._forget(digest)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return False
            self._usage -= size
            self._count -= 1
        return True

    @property
    def usage(self) -> int:
        """Bytes held by stored chunks."""
        return self._usage

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        return (p.name for p in self._files())
