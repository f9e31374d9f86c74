"""Pipelined chunk decode: later chunks decode on threads while earlier ones are written.

Rules:
- Outputs come out strictly in chunk order, one ``bytes`` of exactly ``out_size`` per chunk.
- Chunks are independent (no state crosses a chunk boundary), so chunk k+1 may decode while
  chunk k is being written; the decompressors and ``os.pread`` release the GIL.
- Memory is bounded by a byte budget, not a chunk count: each chunk is charged an upper bound
  of what its decode can hold (:func:`decode_cost`: its bytes, every stream's declared decoded
  length, the largest base window it may read, its output) from the moment it is submitted
  until the consumer asks for the next output after it. A chunk is submitted only while the
  charged total stays within ``budget``; the oldest chunk is always admitted, so a chunk
  larger than the budget decodes alone (the serial decoder's memory, nothing more). One more
  chunk may be read and held back (its compressed bytes only) until it fits.
- Errors keep their place: a chunk that fails to decode, or an input iterator that raises at
  position k, raises only when the consumer reaches position k. Every output before it has
  been yielded and nothing after it is. No output of a failing chunk is ever yielded, because
  a chunk is yielded only once it is completely decoded.
- On error, on exhaustion and when the consumer stops early (``close()``), pending decodes are
  cancelled, running ones waited for, and the pool's threads have ended before control returns.
- The input iterator is pulled only from the consumer's thread (a ``.slb`` reader or a socket
  need not be thread-safe); ``base.pread`` is called from the pool's threads, so a base reader
  must allow concurrent reads (``os.pread`` does).

Example:
    with FileBaseReader(old_path) as base:
        for out in decode_chunks(((c.data, c.out_size) for c in chunks), base):
            dst.write(out)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from firmware_bundles.codec.chunk import (
    ChunkPlan,
    Reader,
    decode_chunk,
    decode_cost,
    plan_chunk,
)
from firmware_bundles.errors import BundleError

__all__ = ["DEFAULT_BUDGET", "DEFAULT_WORKERS", "decode_chunks"]

# Charged bytes in flight. With the default 4 MiB chunks a chunk is charged 7-12 MiB on the
# corpus (output, base window, streams, its bytes), so two or three chunks are in flight.
# Measured peak RSS of the whole apply process (interpreter and codec included): 48-52 MiB on
# the corpus pairs at 28 MiB, 52-60 MiB at 36 MiB (docs/delta-codec.md, "Pipelined apply").
DEFAULT_BUDGET = 28 << 20
# Two decoding threads: the target devices and the bench machine have two cores; the
# consumer's thread runs each chunk's apply loop and the writes beside them.
DEFAULT_WORKERS = 2
# Chunks submitted ahead at most, whatever their size: tiny chunks do not need more to keep
# the threads busy, and each holds futures and buffers.
_MAX_AHEAD = 4


class _Failed:
    """Planning this chunk, or the input iterator, raised here: re-raised in order."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Submitted:
    """A chunk whose jobs are on the pool; ``finish`` joins them on the consumer's thread."""

    def __init__(self, plan: ChunkPlan, pool: ThreadPoolExecutor) -> None:
        self.finish = plan.finish
        # Largest first within a chunk; chunks in order, so the oldest chunk completes first.
        order = sorted(range(len(plan.jobs)), key=lambda i: -plan.sizes[i])
        by_index = {i: pool.submit(plan.jobs[i]) for i in order}
        self.futures = [by_index[i] for i in range(len(plan.jobs))]

    def result(self) -> bytes:
        # In job order: the same error as the serial decoder, however the jobs ran.
        return self.finish([f.result() for f in self.futures])

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


def decode_chunks(chunks: Iterable[tuple[bytes, int]], base: Reader | None, *,
                  budget: int = DEFAULT_BUDGET,
                  workers: int = DEFAULT_WORKERS) -> Iterator[bytes]:
    """Decode ``(data, out_size)`` pairs ahead on a thread pool; yield outputs in order.

    Args:
        chunks: each chunk's bytes (already digest-checked) and its signed output size.
        base: the base image for delta chunks (safe for concurrent ``pread``), else ``None``.
        budget: upper bound of the bytes charged to chunks in flight (see module docstring).
        workers: decoding threads; ``workers <= 0`` decodes serially on the caller's thread.

    Raises:
        DeltaCorrupt, SizeExceeded, Truncated: as ``decode_chunk``, for the first bad chunk,
            after every output before it has been yielded.
        Whatever ``chunks`` raises, at the same position.
    """
    if workers <= 0:
        for data, out_size in chunks:
            pieces = list(decode_chunk(data, out_size, base))
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return
    source = iter(chunks)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delta-pipeline")
    pending: deque[tuple[_Submitted | _Failed, int]] = deque()
    held: tuple[bytes, int, int] | None = None  # read but over budget: submitted later
    charged = 0
    exhausted = False
    try:
        while True:
            # Fill while the budget allows; the oldest chunk is always admitted.
            while len(pending) <= _MAX_AHEAD:
                if held is None:
                    if exhausted:
                        break
                    try:
                        item = next(source, None)
                    except Exception as e:  # re-raised in order, below
                        pending.append((_Failed(e), 0))
                        exhausted = True
                        break
                    if item is None:
                        exhausted = True
                        break
                    held = (item[0], item[1], decode_cost(item[0], item[1]))
                data, out_size, cost = held
                if pending and charged + cost > budget:
                    break
                held = None
                try:
                    job: _Submitted | _Failed = _Submitted(plan_chunk(data, out_size, base), pool)
                except BundleError as e:  # bad headers: refused when the consumer gets here
                    job = _Failed(e)
                pending.append((job, cost))
                charged += cost
                del data
            if not pending:
                return
            job, cost = pending[0]
            if isinstance(job, _Failed):
                raise job.error
            out = job.result()  # raises the chunk's own error, in order
            pending.popleft()
            del job
            yield out
            del out
            # The consumer has written this chunk: its charge is released only now.
            charged -= cost
    finally:
        for job, _ in pending:
            if isinstance(job, _Submitted):
                job.cancel()
        pending.clear()
        pool.shutdown(wait=True, cancel_futures=True)
