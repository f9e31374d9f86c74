"""Decode ahead on the agent's write path: chunk k+1 decodes while chunk k is written.

Rules:
- Only a chunk whose bytes already match the plan's digest is offered (the core checks the
  same digest again before it commands the write): nothing is decoded that the core would not
  write, and a hostile local file is refused by digest before any decoder sees it.
- Writes still happen only through ``WriteChunk``, in the core's order; this only changes
  when a chunk's output is computed. :meth:`DecodeAhead.take` hands back the output, or raises
  the decode's own error, at that chunk's ``WriteChunk``, so a corrupt chunk k is refused with
  its stable code before any byte of it is written, and the core writes nothing after it.
- Memory: the chunks ahead are charged ``decode_cost`` (an upper bound of their decode
  memory) and held within ``budget``; an offer over budget is declined (that chunk is then
  decoded at its write, as without this class). One thread, so one chunk ahead at most.
- :meth:`DecodeAhead.clear` cancels what is queued and joins the thread: none outlives a
  download (end, failure, cancel, refetch).
- Base reads run on this thread beside the disk thread's writes to the *other* slot; the base
  slot's handle must be open before the first offer (``os.pread`` on one fd is thread-safe).

Example:
    ahead = DecodeAhead(budget=16 << 20)
    ahead.offer(1, data1, out_size1, base)      # event loop, as soon as chunk 1 is read
    out = ahead.take(1, data1)                  # disk thread, at chunk 1's WriteChunk
    ahead.clear()
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["AHEAD_BUDGET", "DecodeAhead"]

# One 4 MiB chunk is charged 8-12 MiB on the corpus: one chunk ahead at most. Measured on the
# offline installer (1 GiB full image): 54 -> 66 MiB peak, 14.2 -> 10.1 s; so the agent keeps
# it off unless ``AgentConfig.decode_ahead`` is set (a device with memory to spare).
AHEAD_BUDGET = 16 << 20


def _decode(data: bytes, out_size: int, base: Any) -> bytes:
    from firmware_bundles.codec.chunk import decode_chunk  # noqa: PLC0415 - see offer()

    pieces = list(decode_chunk(data, out_size, base))
    # One piece (always, today): handed on as is, not copied by a join.
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class DecodeAhead:
    """Speculative, digest-checked decodes of the chunks after the one being written."""

    def __init__(self, *, budget: int = AHEAD_BUDGET) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._queued: dict[int, tuple[bytes, Future[bytes], int]] = {}
        self._charged = 0

    def offer(self, index: int, data: bytes, out_size: int, base: Any) -> bool:
        """Start decoding chunk ``index`` (digest already checked) if the budget allows."""
        # The codec loads on first use: an idle daemon never imports it.
        from firmware_bundles.codec.chunk import decode_cost  # noqa: PLC0415

        cost = decode_cost(data, out_size)
        with self._lock:
            if index in self._queued or self._charged + cost > self._budget:
                return False
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-ahead")
            self._queued[index] = (data, self._pool.submit(_decode, data, out_size, base), cost)
            self._charged += cost
            return True

    def take(self, index: int, data: bytes) -> bytes | None:
        """The output of chunk ``index`` if it was offered with these very bytes, else ``None``.

        Raises:
            The decode's own error (``BundleRejected`` subclasses, I/O errors), here, in order.
        """
        with self._lock:
            entry = self._queued.pop(index, None)
        if entry is None:
            return None
        offered, future, cost = entry
        try:
            if offered is not data:  # a refetched copy: decode what the core checked
                future.cancel()
                return None
            return future.result()
        finally:
            with self._lock:
                self._charged -= cost

    def clear(self) -> None:
        """Drop every queued decode and end the thread (waits for a running decode)."""
        with self._lock:
            pool, self._pool = self._pool, None
            for _data, future, _cost in self._queued.values():
                future.cancel()
            self._queued.clear()
            self._charged = 0
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
