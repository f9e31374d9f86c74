"""The journal file (the ``StateStore`` port): replaced atomically, never edited in place."""

from __future__ import annotations

from agent.adapters.fs import FileSystem, OsFileSystem, read_whole, replace_atomically
from agent.errors import JournalError


class FileJournal:
    """One file, replaced with temp + fsync + rename + fsync(dir)."""

    def __init__(self, path: str, *, fs: FileSystem | None = None) -> None:
        self.path = path
        self._fs = fs or OsFileSystem()

    def load(self) -> bytes | None:
        """The saved document, or None on first start."""
        try:
            return read_whole(self._fs, self.path)
        except OSError as e:
            raise JournalError(f"reading {self.path}: {e}", code="journal.corrupt") from e

    def save(self, data: bytes) -> None:
        """Replace the document atomically."""
        try:
            replace_atomically(self._fs, self.path, data)
        except OSError as e:
            raise JournalError(f"writing {self.path}: {e}") from e
