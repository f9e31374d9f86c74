"""The few durable file operations the agent's disk adapters use, behind one seam.

Slots, journal and simulated boot env do all their I/O through a :class:`FileSystem`, so the
power-cut proof (``agent/adapters/faultfs.py``) can sit *under* the real adapters and count
every durable operation (write, fsync, rename, truncate, dir fsync). Production uses
:class:`OsFileSystem`, a thin layer over ``os``.

Rules: nothing is durable before ``fsync`` (data) and ``fsync_dir`` (names); adapters that
promise durability call both.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol


class FileSystem(Protocol):
    """Durable file primitives (handles are opaque ints)."""

    def open(self, path: str, *, write: bool, create: bool = False) -> int:
        """Open a file; ``write=False`` opens it read-only."""
        ...

    def close(self, handle: int) -> None:
        """Close a handle."""
        ...

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset``."""
        ...

    def pwrite(self, handle: int, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset`` (durable only after ``fsync``)."""
        ...

    def fsync(self, handle: int) -> None:
        """Make the file's data durable."""
        ...

    def truncate(self, handle: int, size: int) -> None:
        """Set the file's size (sparse when growing)."""
        ...

    def size(self, handle: int) -> int:
        """Current size in bytes."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` with ``src`` (durable after ``fsync_dir``)."""
        ...

    def fsync_dir(self, path: str) -> None:
        """Make the names in directory ``path`` durable."""
        ...

    def unlink(self, path: str) -> None:
        """Remove a name (no error if missing)."""
        ...

    def exists(self, path: str) -> bool:
        """Whether the name exists."""
        ...

    def drop_cache(self, handle: int) -> None:
        """Forget cached pages so the next read comes from the medium."""
        ...


class OsFileSystem:
    """The real thing."""

    def open(self, path: str, *, write: bool, create: bool = False) -> int:
        """Open with ``os.open`` (close-on-exec by default in Python)."""
        flags = os.O_RDWR if write else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        return os.open(path, flags, 0o600)

    def close(self, handle: int) -> None:
        """Close."""
        os.close(handle)

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        """Read, looping over short reads until EOF or ``length``."""
        parts: list[bytes] = []
        got = 0
        while got < length:
            part = os.pread(handle, length - got, offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def pwrite(self, handle: int, offset: int, data: bytes) -> None:
        """Write everything, looping over short writes."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(handle, view[done:], offset + done)

    def fsync(self, handle: int) -> None:
        """Fsync."""
        os.fsync(handle)

    def truncate(self, handle: int, size: int) -> None:
        """Ftruncate."""
        os.ftruncate(handle, size)

    def size(self, handle: int) -> int:
        """Size via lseek, which also works for block devices (st_size is 0 there)."""
        return os.lseek(handle, 0, os.SEEK_END)

    def rename(self, src: str, dst: str) -> None:
        """os.replace."""
        os.replace(src, dst)  # noqa: PTH105 - plain str paths in this seam

    def fsync_dir(self, path: str) -> None:
        """Fsync a directory handle."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        """Remove if present."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # noqa: PTH108 - plain str paths in this seam

    def exists(self, path: str) -> bool:
        """os.path.exists."""
        return os.path.exists(path)  # noqa: PTH110 - plain str paths throughout this seam

    def drop_cache(self, handle: int) -> None:
        """posix_fadvise DONTNEED (after fsync, so the pages are clean and can be dropped)."""
        os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)


def read_whole(fs: FileSystem, path: str) -> bytes | None:
    """A whole small file, or None if it does not exist."""
    if not fs.exists(path):
        return None
    h = fs.open(path, write=False)
    try:
        return fs.pread(h, 0, fs.size(h))
    finally:
        fs.close(h)


def replace_atomically(fs: FileSystem, path: str, data: bytes) -> None:
    """Temp file, write, fsync, rename over ``path``, fsync the directory.

    A power cut at any point leaves either the old or the new content under ``path``.
    """
    directory = os.path.dirname(path) or "."  # noqa: PTH120 - plain str paths in this seam
    tmp = f"{path}.tmp"
    fs.unlink(tmp)
    h = fs.open(tmp, write=True, create=True)
    try:
        fs.truncate(h, 0)
        fs.pwrite(h, 0, data)
        fs.fsync(h)
    finally:
        fs.close(h)
    fs.rename(tmp, path)
    fs.fsync_dir(directory)
