"""An in-memory file system that loses power on demand (for the power-cut proof and simulator).

It implements :class:`agent.adapters.fs.FileSystem` with the durability rules of a careful
POSIX file system: written data is durable only after ``fsync`` of that file, names (create,
rename, unlink) only after ``fsync_dir`` of their directory. Every durable operation (pwrite,
fsync, truncate, rename, unlink, fsync_dir) is counted in ``ops``; with ``cut_after=k`` the
k-th operation happens and then :class:`PowerCut` is raised, and every later call raises too.

``crash(mode)`` returns a new file system holding what survived:

- ``"drop"``: only what was fsynced (the usual worst case);
- ``"keep"``: everything written, as if the cache had been flushed just in time (catches code
  that relies on a write *not* landing);
- ``"tear"``: like drop, plus the first half of the last unsynced write of the last file
  written (a torn sector).

Fault knobs named after physical events: ``no_space_after`` (bytes of writes before ENOSPC),
``io_error_paths`` (EIO on any write/read of these paths), ``readonly_after_n_writes``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field


class PowerCut(BaseException):
    """The power went out. A BaseException so adapters' ``except Exception`` never eat it."""


@dataclass
class _Inode:
    durable: bytearray = field(default_factory=bytearray)
    current: bytearray = field(default_factory=bytearray)
    unsynced: list[tuple[int, bytes]] = field(default_factory=list)
    durable_size: int = 0


@dataclass
class _Handle:
    path: str
    inode: _Inode
    write: bool


class FaultFS:
    """See the module docstring."""

    def __init__(self) -> None:
        self._names: dict[str, _Inode] = {}
        self._durable_names: dict[str, _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._next = 3
        self.ops = 0
        self.cut_after: int | None = None
        self.dead = False
        self.last_write: tuple[_Inode, int, bytes] | None = None
        self.no_space_after: int | None = None
        self.io_error_paths: set[str] = set()
        self.readonly_after_n_writes: int | None = None
        self._written_bytes = 0
        self._writes = 0
        self.op_log: list[str] = []

    # -- power ---------------------------------------------------------------------------

    def _op(self, what: str) -> None:
        if self.dead:
            raise PowerCut(what)
        self.ops += 1
        self.op_log.append(what)

    def _after(self) -> None:
        if self.cut_after is not None and self.ops >= self.cut_after:
            self.dead = True
            raise PowerCut(f"after op {self.ops}")

    def _check_alive(self) -> None:
        if self.dead:
            raise PowerCut("no power")

    def crash(self, mode: str = "drop") -> FaultFS:
        """What a reboot finds on the medium (see the module docstring)."""
        new = FaultFS()
        src_names = self._names if mode == "keep" else self._durable_names
        mapping: dict[int, _Inode] = {}
        for path, inode in src_names.items():
            if id(inode) not in mapping:
                if mode == "keep":
                    data = bytearray(inode.current)
                else:
                    data = bytearray(inode.durable[: inode.durable_size])
                    if mode == "tear" and self.last_write is not None:
                        last_inode, offset, chunk = self.last_write
                        if last_inode is inode and inode.unsynced:
                            half = chunk[: max(1, len(chunk) // 2)]
                            end = offset + len(half)
                            if len(data) < end:
                                data.extend(b"\0" * (end - len(data)))
                            data[offset:end] = half
                mapping[id(inode)] = _Inode(
                    durable=bytearray(data), current=bytearray(data), durable_size=len(data)
                )
            new._names[path] = mapping[id(inode)]
        new._durable_names = dict(new._names)
        return new

    # -- FileSystem ------------------------------------------------------------------------

    def open(self, path: str, *, write: bool, create: bool = False) -> int:
        """Open (creating a name is a namespace change, durable after fsync_dir)."""
        self._check_alive()
        inode = self._names.get(path)
        if inode is None:
            if not create:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            inode = _Inode()
            self._names[path] = inode
        h = self._next
        self._next += 1
        self._handles[h] = _Handle(path, inode, write)
        return h

    def close(self, handle: int) -> None:
        """Close."""
        self._handles.pop(handle, None)

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        """Read from the current (cached) content."""
        self._check_alive()
        hd = self._handles[handle]
        if hd.path in self.io_error_paths:
            raise OSError(errno.EIO, "I/O error", hd.path)
        return bytes(hd.inode.current[offset : offset + length])

    def pwrite(self, handle: int, offset: int, data: bytes) -> None:
        """Write into the cache; counted."""
        hd = self._handles[handle]
        if not hd.write:
            raise OSError(errno.EBADF, "not open for writing", hd.path)
        self._check_alive()
        if hd.path in self.io_error_paths:
            raise OSError(errno.EIO, "I/O error", hd.path)
        if (
            self.readonly_after_n_writes is not None
            and self._writes >= self.readonly_after_n_writes
        ):
            raise OSError(errno.EROFS, "read-only file system", hd.path)
        grow = max(0, offset + len(data) - len(hd.inode.current))
        if self.no_space_after is not None and self._written_bytes + grow > self.no_space_after:
            raise OSError(errno.ENOSPC, "no space left on device", hd.path)
        self._op(f"write {hd.path}@{offset}+{len(data)}")
        self._writes += 1
        self._written_bytes += grow
        cur = hd.inode.current
        if len(cur) < offset:
            cur.extend(b"\0" * (offset - len(cur)))
        cur[offset : offset + len(data)] = data
        hd.inode.unsynced.append((offset, bytes(data)))
        self.last_write = (hd.inode, offset, bytes(data))
        self._after()

    def fsync(self, handle: int) -> None:
        """Make the inode's data durable."""
        hd = self._handles[handle]
        self._op(f"fsync {hd.path}")
        ino = hd.inode
        ino.durable = bytearray(ino.current)
        ino.durable_size = len(ino.current)
        ino.unsynced.clear()
        self._after()

    def truncate(self, handle: int, size: int) -> None:
        """Resize (a metadata change: durable with the next fsync of the file)."""
        hd = self._handles[handle]
        self._op(f"truncate {hd.path} {size}")
        cur = hd.inode.current
        if len(cur) > size:
            del cur[size:]
        else:
            cur.extend(b"\0" * (size - len(cur)))
        hd.inode.unsynced.append((size, b""))
        self._after()

    def size(self, handle: int) -> int:
        """Current size."""
        self._check_alive()
        return len(self._handles[handle].inode.current)

    def rename(self, src: str, dst: str) -> None:
        """Replace ``dst`` in the namespace (durable after fsync_dir)."""
        self._op(f"rename {src} {dst}")
        inode = self._names.pop(src)
        self._names[dst] = inode
        self._after()

    def fsync_dir(self, path: str) -> None:
        """Make every name under ``path`` durable as it is now."""
        self._op(f"fsync_dir {path}")
        prefix = path.rstrip("/") + "/"
        for name in [n for n in self._durable_names if n.startswith(prefix)]:
            if "/" not in name[len(prefix) :]:
                del self._durable_names[name]
        for name, inode in self._names.items():
            if name.startswith(prefix) and "/" not in name[len(prefix) :]:
                self._durable_names[name] = inode
        self._after()

    def unlink(self, path: str) -> None:
        """Remove a name."""
        self._check_alive()
        if path in self._names:
            self._op(f"unlink {path}")
            del self._names[path]
            self._after()

    def exists(self, path: str) -> bool:
        """Whether the name exists now."""
        self._check_alive()
        return path in self._names

    def drop_cache(self, handle: int) -> None:
        """Nothing is cached apart from the medium here: reads see ``current``."""
        self._check_alive()
        del handle

    # -- helpers for tests and the simulator --------------------------------------------

    def put(self, path: str, data: bytes) -> None:
        """Create a durable file with this content (factory state; not counted)."""
        inode = _Inode(durable=bytearray(data), current=bytearray(data), durable_size=len(data))
        self._names[path] = inode
        self._durable_names[path] = inode

    def settle(self) -> None:
        """Make everything durable as it is now (end of factory setup; not counted)."""
        for inode in self._names.values():
            inode.durable = bytearray(inode.current)
            inode.durable_size = len(inode.current)
            inode.unsynced.clear()
        self._durable_names = dict(self._names)

    def content(self, path: str) -> bytes:
        """Current content of a file (not counted)."""
        return bytes(self._names[path].current)


def join(*parts: str) -> str:
    """Path join for the in-memory namespace (same rules as os.path)."""
    return os.path.join(*parts)  # noqa: PTH118 - plain str paths in this seam
