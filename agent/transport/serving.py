"""Serving chunks to devices over MQTT, fairly: the server half of ``fetch``/``chunk``.

Used by the controller gateway (chunks from the controller's store) and by the site relay
(chunks from its cache, filled once over the WAN). It lives beside the MQTT client wrapper rather
than in ``controller/`` because a relay runs on a site box without the controller installed.

Rules:

* Every ``fetch`` message is size-capped and validated; a malformed one is counted and dropped.
* Per-device limits: a message bucket on ``fetch`` (excess dropped, counted), at most
  ``max_pending`` indices queued, at most ``per_device_inflight`` chunks being served at once.
  Devices are served round-robin, so a device flooding ``fetch`` gets its share, not more.
* Per-site budget: every served chunk is charged to the device's site (``SiteBudgets``); while a
  site is in debt its devices wait and other sites' devices go ahead.
* At most ``max_unacked`` chunk publishes await their PUBACK: memory stays bounded and the
  broker is not flooded faster than it acknowledges.
* ``ping`` is answered at once with a ``PONG`` frame (the agent's "can reach the controller").
* A resolver may be a plain function (the controller's store: the chunk is served in the
  scheduler's own pass, no task per chunk) or a coroutine function (the relay, which may wait on
  its WAN: one task per chunk). A served chunk's slot is released by its PUBACK, or after
  ``ack_timeout`` if none comes (a link that never returns must not pin slots forever).

    server = ChunkServer(client, resolve, site_of=lambda d: None)
    server.start()
    ... client's on_message for <prefix>/+/fetch calls server.on_fetch(device_id, payload)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.ports import Clock
from agent.transport.aioclient import AsyncMqttClient
from firmware_bundles import protocol as wire
from firmware_bundles.errors import BundleError, TransferError
from firmware_bundles.throttle import SiteBudgets, TokenBucket

log = logging.getLogger(__name__)

# device, bundle, index -> the chunk's bytes, None if not offered to this device.
Resolver = Callable[[str, str, int], Awaitable[bytes | None] | bytes | None]


@dataclass(frozen=True)
class ServingLimits:
    """Per-device limits of the chunk server."""

    fetch_rate: float = 50.0  # fetch messages per second per device
    fetch_burst: float = 100.0
    max_pending: int = 256  # indices queued per device
    per_device_inflight: int = 4
    max_unacked: int = 64
    ack_timeout: float = 30.0  # seconds a served chunk may hold its slot without a PUBACK


@dataclass
class ServingStats:
    """Counters of the chunk server."""

    drops: wire.DropCounter = field(default_factory=wire.DropCounter)
    requests: int = 0
    served: int = 0
    served_bytes: int = 0
    not_found: int = 0
    pongs: int = 0


@dataclass
class _Device:
    device_id: str
    bucket: TokenBucket
    pending: deque[tuple[str, int]] = field(default_factory=deque)
    queued: set[tuple[str, int]] = field(default_factory=set)
    inflight: int = 0
    topic: str = ""  # its chunk topic, built once (device ids are validated when built)


class ChunkServer:
    """Round-robin, budgeted chunk serving on one MQTT client."""

    def __init__(
        self,
        client: AsyncMqttClient,
        resolve: Resolver,
        *,
        site_of: Callable[[str], str | None],
        clock: Clock,
        budgets: SiteBudgets | None = None,
        limits: ServingLimits | None = None,
    ) -> None:
        self.client = client
        self.resolve = resolve
        self.site_of = site_of
        self.clock = clock
        self.budgets = budgets or SiteBudgets()
        self.limits = limits or ServingLimits()
        self.stats = ServingStats()
        self._devices: dict[str, _Device] = {}
        self._ready: deque[str] = deque()
        self._ready_set: set[str] = set()
        self._wakeup = asyncio.Event()
        self._busy = 0  # chunks resolving or awaiting their PUBACK (<= max_unacked)
        # PUBACK futures of served chunks -> (device, deadline); whichever of the PUBACK and the
        # sweep comes first releases the slot, exactly once.
        self._unacked: dict[asyncio.Future[int], tuple[_Device, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start the scheduler on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop serving (queued requests are forgotten; devices ask again)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._tasks):
            task.cancel()

    def _device(self, device_id: str) -> _Device:
        dev = self._devices.get(device_id)
        if dev is None:
            dev = _Device(device_id, TokenBucket(self.limits.fetch_rate, self.limits.fetch_burst))
            dev.topic = wire.device_topic(device_id, wire.Channel.CHUNK)
            self._devices[device_id] = dev
        return dev

    def on_fetch(self, device_id: str, payload: bytes) -> None:
        """Handle one ``fetch`` message from ``device_id`` (topic already parsed). Never raises."""
        dev = self._device(device_id)
        # Rate-limit by message before parsing: a flood costs one bucket update per message.
        if dev.bucket.reserve(1, self.clock.monotonic()) > 0:
            self.stats.drops.drop("transfer.rate_limited")
            return
        try:
            request = wire.decode_fetch(payload)
        except BundleError as e:
            self.stats.drops.drop(e.code)
            return
        self.stats.requests += 1
        if request.op is wire.FetchOp.PING:
            self.stats.pongs += 1
            frame = wire.ChunkFrame(request.request_id[:128], 0, wire.ChunkStatus.PONG)
            self.client.publish(dev.topic, wire.encode_chunk(frame))
            return
        was_idle = not dev.pending
        for index in request.indices:
            key = (request.bundle_id, index)
            if key in dev.queued:
                continue
            if len(dev.pending) >= self.limits.max_pending:
                self.stats.drops.drop("transfer.queue_full")
                break
            dev.pending.append(key)
            dev.queued.add(key)
        if was_idle and dev.pending:
            self._mark_ready(device_id)

    def _mark_ready(self, device_id: str) -> None:
        if device_id not in self._ready_set:
            self._ready_set.add(device_id)
            self._ready.append(device_id)
        self._wakeup.set()

    async def _run(self) -> None:
        # A bug in the scheduler must not stop serving for good: log, pause, carry on.
        while True:
            try:
                await self._schedule()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("chunk scheduler failed; restarting it")
                await asyncio.sleep(0.1)

    async def _schedule(self) -> None:
        while True:
            self._sweep()
            if not self._ready:
                self._wakeup.clear()
                await self._wait(None)
                continue
            parked: list[str] = []
            earliest: float | None = None
            progressed = False
            for _ in range(len(self._ready)):
                device_id = self._ready.popleft()
                self._ready_set.discard(device_id)
                dev = self._devices[device_id]
                if not dev.pending:
                    continue
                if dev.inflight >= self.limits.per_device_inflight:
                    parked.append(device_id)
                    continue
                if self._busy >= self.limits.max_unacked:
                    # Every slot awaits a PUBACK: whoever is left keeps its place in the round.
                    parked.append(device_id)
                    continue
                site = self.site_of(device_id)
                delay = self.budgets.delay(site, self.clock.monotonic(), self.clock.now())
                if delay > 0:
                    parked.append(device_id)
                    earliest = delay if earliest is None else min(earliest, delay)
                    continue
                bundle_id, index = dev.pending.popleft()
                dev.queued.discard((bundle_id, index))
                dev.inflight += 1
                self._busy += 1
                self._dispatch(dev, site, bundle_id, index)
                progressed = True
                if dev.pending:
                    self._mark_ready(device_id)
            for device_id in parked:
                self._mark_ready(device_id)
            if not progressed:
                self._wakeup.clear()
                # Nothing could go: wait for a PUBACK, a fetch, or the site budget.
                await self._wait(earliest if earliest is not None else 0.05)
            else:
                # Let the loop read PUBACKs and fetches between passes.
                await asyncio.sleep(0)

    async def _wait(self, timeout: float | None) -> None:
        if self._unacked:
            # Wake for the PUBACK sweep even when nothing else happens.
            sweep = self.limits.ack_timeout / 4
            timeout = sweep if timeout is None else min(timeout, sweep)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _sweep(self) -> None:
        if not self._unacked:
            return
        now = self.clock.monotonic()
        expired = [fut for fut, (_dev, deadline) in self._unacked.items() if deadline <= now]
        for fut in expired:
            # Bounded wait: a lost link holds the PUBACK; paho redelivers within the session.
            self._acked(fut)

    def _dispatch(self, dev: _Device, site: str | None, bundle_id: str, index: int) -> None:
        try:
            result = self.resolve(dev.device_id, bundle_id, index)
        except TransferError as e:
            self._refuse(dev, bundle_id, index, e)
            return
        except Exception:
            log.exception("resolving chunk %s/%d failed", bundle_id, index)
            result = None
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._serve_later(dev, site, bundle_id, index, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._send(dev, site, bundle_id, index, result)

    async def _serve_later(
        self,
        dev: _Device,
        site: str | None,
        bundle_id: str,
        index: int,
        pending: Awaitable[bytes | None],
    ) -> None:
        try:
            data = await pending
        except TransferError as e:
            self._refuse(dev, bundle_id, index, e)
            return
        except asyncio.CancelledError:
            self._release(dev)
            raise
        except Exception:
            log.exception("resolving chunk %s/%d failed", bundle_id, index)
            data = None
        self._send(dev, site, bundle_id, index, data)

    def _refuse(self, dev: _Device, bundle_id: str, index: int, error: TransferError) -> None:
        # Temporarily unavailable (a relay's WAN is down): the device asks again.
        frame = wire.ChunkFrame(bundle_id, index, wire.ChunkStatus.REFUSED, error.code.encode())
        self.client.publish(dev.topic, wire.encode_chunk(frame))
        self._release(dev)

    def _send(
        self, dev: _Device, site: str | None, bundle_id: str, index: int, data: bytes | None
    ) -> None:
        if data is not None and len(data) > wire.MAX_CHUNK_DATA:
            log.error("chunk %s/%d of %d bytes exceeds the frame cap", bundle_id, index, len(data))
            data = None
        if data is None:
            self.stats.not_found += 1
            frame = wire.ChunkFrame(bundle_id, index, wire.ChunkStatus.NOT_FOUND)
            self.client.publish(dev.topic, wire.encode_chunk(frame))
            self._release(dev)
            return
        size = len(data)
        self.budgets.charge(site, size, self.clock.monotonic(), self.clock.now())
        try:
            fut = self.client.publish(dev.topic, _chunk_frame(bundle_id, index, data))
        except Exception:
            log.exception("publishing chunk %s/%d failed", bundle_id, index)
            self._release(dev)
            return
        self.stats.served += 1
        self.stats.served_bytes += size
        if fut.done():
            self._release(dev)
            return
        self._unacked[fut] = (dev, self.clock.monotonic() + self.limits.ack_timeout)
        fut.add_done_callback(self._acked)

    def _acked(self, fut: asyncio.Future[int]) -> None:
        entry = self._unacked.pop(fut, None)
        if entry is not None:
            self._release(entry[0])

    def _release(self, dev: _Device) -> None:
        dev.inflight -= 1
        self._busy -= 1
        if dev.pending:
            self._mark_ready(dev.device_id)
        self._wakeup.set()


def _chunk_frame(bundle_id: str, index: int, data: bytes) -> bytes:
    """``wire.encode_chunk`` of an OK frame without building a ``ChunkFrame`` per chunk.

    The bundle id and index were validated when the fetch was decoded, the size by the caller.
    Same bytes as ``encode_chunk``
    (``tests/transport/test_wire_protocol.py`` holds both to the same frame).
    """
    bid = bundle_id.encode()
    header = wire.CHUNK_HEADER.pack(
        wire.CHUNK_MAGIC, wire.PROTOCOL_VERSION, wire.ChunkStatus.OK, len(bid), index
    )
    return b"".join((header, bid, data))
