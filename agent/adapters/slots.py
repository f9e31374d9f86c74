"""Slot adapters (the ``SlotStore`` port): file-backed and block-device slots.

The slot that must not be written (the booted one) is opened read-only and the adapter has no
writable handle for it at all: a write to it raises :class:`ActiveSlotWrite` before any I/O, so
"the active slot is never written" holds by construction, whatever the caller does.

- :class:`FileSlots`: two sparse files (the simulator and tests); created at their capacity.
- :class:`BlockSlots`: two partitions (``/dev/mmcblk0p2``...); never created or resized; the
  digest is read back from the device after dropping the page cache, so it checks what the
  medium holds, not what we wrote into memory.

Errors are wrapped: ENOSPC -> :class:`SlotNoSpace`, other ``OSError`` -> :class:`SlotError`.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Mapping

from agent.adapters.fs import FileSystem, OsFileSystem
from agent.core.states import BootSlot
from agent.errors import ActiveSlotWrite, SlotError, SlotNoSpace

READ_BLOCK = 1024 * 1024


def _wrap(e: OSError, what: str) -> SlotError:
    if e.errno == errno.ENOSPC:
        return SlotNoSpace(f"{what}: {e.strerror}")
    return SlotError(f"{what}: {e.strerror or e}")


class _Slots:
    def __init__(
        self,
        paths: Mapping[BootSlot, str],
        *,
        booted: BootSlot,
        fs: FileSystem,
        capacity: int | None,
        drop_cache: bool,
    ) -> None:
        self._fs = fs
        self._paths = dict(paths)
        self._booted = booted
        self._capacity = capacity
        self._drop_cache = drop_cache
        self._handles: dict[BootSlot, int] = {}

    def _handle(self, slot: BootSlot) -> int:
        h = self._handles.get(slot)
        if h is None:
            writable = slot is not self._booted
            create = writable and self._capacity is not None
            try:
                h = self._fs.open(self._paths[slot], write=writable, create=create)
                if create and self._capacity is not None and self._fs.size(h) != self._capacity:
                    self._fs.truncate(h, self._capacity)
            except OSError as e:
                raise _wrap(e, f"opening slot {slot.value}") from e
            self._handles[slot] = h
        return h

    def close(self) -> None:
        """Close every handle."""
        for h in self._handles.values():
            self._fs.close(h)
        self._handles.clear()

    def size(self, slot: BootSlot) -> int:
        """Capacity in bytes."""
        if self._capacity is not None:
            return self._capacity
        try:
            return self._fs.size(self._handle(slot))
        except OSError as e:
            raise _wrap(e, f"sizing slot {slot.value}") from e

    def read(self, slot: BootSlot, offset: int, length: int) -> bytes:
        """Read (delta bases, read-back)."""
        try:
            return self._fs.pread(self._handle(slot), offset, length)
        except OSError as e:
            raise _wrap(e, f"reading slot {slot.value}") from e

    def write(self, slot: BootSlot, offset: int, data: bytes) -> None:
        """Write to the inactive slot; the booted one has no writable handle."""
        if slot is self._booted:
            raise ActiveSlotWrite(f"slot {slot.value} is the booted slot")
        if offset < 0 or offset + len(data) > self.size(slot):
            raise SlotError(f"write past the end of slot {slot.value}")
        try:
            self._fs.pwrite(self._handle(slot), offset, data)
        except OSError as e:
            raise _wrap(e, f"writing slot {slot.value}") from e

    def sync(self, slot: BootSlot) -> None:
        """Fsync the slot."""
        if slot is self._booted:
            raise ActiveSlotWrite(f"slot {slot.value} is the booted slot")
        try:
            self._fs.fsync(self._handle(slot))
        except OSError as e:
            raise _wrap(e, f"syncing slot {slot.value}") from e

    def digest(self, slot: BootSlot, length: int) -> str:
        """SHA-256 of the first ``length`` bytes, read from the medium."""
        h = self._handle(slot)
        sha = hashlib.sha256()
        try:
            if self._drop_cache:
                self._fs.drop_cache(h)
            offset = 0
            while offset < length:
                block = self._fs.pread(h, offset, min(READ_BLOCK, length - offset))
                if not block:
                    break
                sha.update(block)
                offset += len(block)
        except OSError as e:
            raise _wrap(e, f"reading back slot {slot.value}") from e
        if offset < length:
            # A short slot can never match a signed digest of ``length`` bytes.
            return "short:" + sha.hexdigest()
        return sha.hexdigest()


class FileSlots(_Slots):
    """Two sparse files of ``capacity`` bytes each."""

    def __init__(
        self,
        path_a: str,
        path_b: str,
        *,
        booted: BootSlot,
        capacity: int,
        fs: FileSystem | None = None,
    ) -> None:
        super().__init__(
            {BootSlot.A: path_a, BootSlot.B: path_b},
            booted=booted,
            fs=fs or OsFileSystem(),
            capacity=capacity,
            drop_cache=False,
        )


class BlockSlots(_Slots):
    """Two partitions (or any existing files): never created, read back past the page cache."""

    def __init__(
        self, path_a: str, path_b: str, *, booted: BootSlot, fs: FileSystem | None = None
    ) -> None:
        super().__init__(
            {BootSlot.A: path_a, BootSlot.B: path_b},
            booted=booted,
            fs=fs or OsFileSystem(),
            capacity=None,
            drop_cache=True,
        )
