"""The agent's MQTT transport: ``agent.ports.Transport`` over MQTT v5 (paho on asyncio).

Rules:

* The device id is the CN of its client certificate; every topic is ``slotline/v1/dev/<id>/..``
  and the broker ACL confines the device there. The transport never trusts the broker anyway:
  commands go through ``verify`` (signature, device, counter, expiry) before ``commands()``
  yields them, when the runtime supplies a verifier.
* Persistent session (clean_start off, session expiry), last will ``online: false`` retained,
  ``online: true`` retained on every connect, ``state`` retained, everything QoS1.
* QoS1 means at least once: a redelivered command (same bytes) is dropped by digest; a replayed
  or out-of-order older command fails the verifier's counter check; a duplicate or unrequested
  chunk is dropped. Each is counted in ``stats``.
* Chunk transfer: ``fetch_chunks`` keeps up to ``window`` chunks requested, refilled in
  batches (one fetch message per refill, sent once half the window is free); each arrival is
  charged to the device's throttle (a token bucket following its link profile), and no new request
  leaves while the bucket is in debt, so the average stays at the cap. After a reconnect the
  broker redelivers what the server already sent (persistent session); only chunks that still do
  not come within ``request_timeout`` are asked for again. A caller resuming after a reboot passes
  only its missing indices.

    transport = MqttTransport("dev-1", MqttSettings(host="broker", port=8883, client_id="dev-1",
                              tls=TlsFiles(ca, cert, key)), clock=SystemClock())
    await transport.start()
    async for index, data in transport.fetch_chunks(bundle_id, missing):
        ...   # verify against the signed chunk table, then write
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.ports import Clock
from agent.transport.aioclient import AsyncMqttClient, MqttSettings, Will
from firmware_bundles import protocol as wire
from firmware_bundles.errors import BundleError, ProtocolViolation, TopicInvalid, TransferError
from firmware_bundles.throttle import UNLIMITED, LinkProfile, ScheduledBucket

CommandVerifier = Callable[[bytes], Any]
_SEEN_COMMANDS = 256


class SystemClock:
    """The real clock (``agent.ports.Clock``)."""

    def now(self) -> float:
        """Wall-clock UNIX seconds."""
        return time.time()

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()


@dataclass
class TransportStats:
    """What the transport saw: drops by code, bytes and re-requests (for reports and benches)."""

    drops: wire.DropCounter = field(default_factory=wire.DropCounter)
    commands: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    duplicate_chunks: int = 0
    duplicate_bytes: int = 0
    re_requests: int = 0


@dataclass
class _Fetch:
    bundle_id: str
    wanted: set[int]
    frames: asyncio.Queue[wire.ChunkFrame] = field(default_factory=asyncio.Queue)


class MqttTransport:
    """``agent.ports.Transport`` for one device over MQTT v5."""

    def __init__(
        self,
        device_id: str,
        settings: MqttSettings,
        *,
        clock: Clock | None = None,
        profile: LinkProfile = UNLIMITED,
        window: int = 4,
        request_timeout: float = 15.0,
        patience: float = 120.0,
        verify: CommandVerifier | None = None,
    ) -> None:
        self.device_id = wire.check_device_id(device_id)
        self.clock: Clock = clock or SystemClock()
        self.stats = TransportStats()
        self.window = max(1, window)
        self.request_timeout = request_timeout
        self.patience = patience
        self._verify = verify
        self._bucket = ScheduledBucket(profile)
        self._topics = {ch: wire.device_topic(device_id, ch) for ch in wire.Channel}
        will = Will(self._topics[wire.Channel.ONLINE], wire.encode_online(online=False))
        self.client = AsyncMqttClient(
            replace(settings, will=will),
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        self._commands: asyncio.Queue[bytes] = asyncio.Queue()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._fetches: dict[str, list[_Fetch]] = {}
        self._pings: dict[str, asyncio.Future[None]] = {}
        self._reconnected = asyncio.Event()
        self._session_lost = False
        self._size_estimate = 0.0
        self._charged: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect (and keep reconnecting in the background)."""
        await self.client.start()

    async def stop(self) -> None:
        """Say offline and disconnect cleanly."""
        if self.client.connected:
            fut = self.client.publish(
                self._topics[wire.Channel.ONLINE], wire.encode_online(online=False), retain=True
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(fut, 2.0)
        await self.client.stop()

    def _on_connect(self, session_present: bool) -> None:
        self.client.publish(
            self._topics[wire.Channel.ONLINE], wire.encode_online(online=True), retain=True
        )
        # Subscribing again is harmless when the session survived, and needed when it did not.
        task = asyncio.ensure_future(
            self.client.subscribe(
                [(self._topics[wire.Channel.CMD], 1), (self._topics[wire.Channel.CHUNK], 1)]
            )
        )
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._session_lost = not session_present
        self._reconnected.set()

    def _on_disconnect(self) -> None:
        self._reconnected.clear()

    # ------------------------------------------------------------------ inbound

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        del retained
        try:
            device_id, channel = wire.parse_topic(topic)
            if device_id != self.device_id:
                raise TopicInvalid(f"message for {device_id} reached {self.device_id}")
            if channel is wire.Channel.CMD:
                self._on_command(payload)
            elif channel is wire.Channel.CHUNK:
                self._on_chunk(wire.decode_chunk(payload))
            else:
                raise ProtocolViolation(f"device received on {channel.value}")
        except BundleError as e:
            self.stats.drops.drop(e.code)

    def _on_command(self, payload: bytes) -> None:
        wire.check_command_shape(payload)
        digest = hashlib.sha256(payload).digest()
        if digest in self._seen:
            # QoS1 redelivery of a command already handed over: idempotent drop.
            self.stats.drops.drop("command.duplicate")
            return
        self._seen[digest] = None
        while len(self._seen) > _SEEN_COMMANDS:
            self._seen.popitem(last=False)
        if self._verify is not None:
            try:
                self._verify(payload)
            except BundleError as e:
                self.stats.drops.drop(e.code)
                self._report_rejected(e.code, str(e))
                return
        self.stats.commands += 1
        self._commands.put_nowait(payload)

    def _report_rejected(self, code: str, message: str) -> None:
        doc = {"type": "command_rejected", "code": code, "message": message[:200]}
        self.client.publish(
            self._topics[wire.Channel.EVENTS], wire.encode_document(wire.Channel.EVENTS, doc)
        )

    def _on_chunk(self, frame: wire.ChunkFrame) -> None:
        if frame.status is wire.ChunkStatus.PONG:
            fut = self._pings.pop(frame.bundle_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        for fetch in self._fetches.get(frame.bundle_id, ()):
            if frame.index in fetch.wanted:
                fetch.frames.put_nowait(frame)
                return
        # Late redelivery for a finished transfer, or never requested.
        self.stats.drops.drop("transfer.unrequested")
        self.stats.duplicate_bytes += len(frame.data)

    async def _commands_iter(self) -> AsyncIterator[bytes]:
        while True:
            yield await self._commands.get()

    def commands(self) -> AsyncIterator[bytes]:
        """Signed command documents addressed to this device (verified when a verifier is set)."""
        return self._commands_iter()

    # ------------------------------------------------------------------ outbound

    async def publish_state(self, state: Mapping[str, Any]) -> None:
        """Publish the retained state document (queued while offline, sent on reconnect)."""
        payload = wire.encode_document(wire.Channel.STATE, dict(state))
        self.client.publish(self._topics[wire.Channel.STATE], payload, retain=True)

    async def publish_event(self, event: Mapping[str, Any]) -> None:
        """Publish one event (queued while offline)."""
        payload = wire.encode_document(wire.Channel.EVENTS, dict(event))
        self.client.publish(self._topics[wire.Channel.EVENTS], payload)

    async def reachable(self, timeout: float) -> bool:
        """Ping the server side over ``fetch``; True if a pong comes back within ``timeout``.

        The ping is repeated every second: the first one may leave before a subscription (ours
        or the server's) is in place.
        """
        loop = asyncio.get_running_loop()
        request_id = uuid.uuid4().hex
        fut: asyncio.Future[None] = loop.create_future()
        self._pings[request_id] = fut
        payload = wire.encode_fetch(wire.FetchRequest(op=wire.FetchOp.PING, request_id=request_id))
        deadline = loop.time() + timeout
        try:
            while not fut.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                if self.client.connected:
                    self.client.publish(self._topics[wire.Channel.FETCH], payload, qos=0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), min(1.0, remaining))
        finally:
            self._pings.pop(request_id, None)
        return True

    # ------------------------------------------------------------------ chunks

    def _request(self, bundle_id: str, indices: list[int]) -> None:
        request = wire.FetchRequest(
            op=wire.FetchOp.CHUNKS,
            request_id=uuid.uuid4().hex[:16],
            bundle_id=bundle_id,
            indices=tuple(indices),
        )
        self.client.publish(self._topics[wire.Channel.FETCH], wire.encode_fetch(request))

    def fetch_chunks(self, bundle_id: str, indices: list[int]) -> AsyncIterator[tuple[int, bytes]]:
        """Request chunks; yield ``(index, bytes)`` once each, paced by the throttle.

        Raises:
            TransferError: the server does not offer a chunk (``transfer.not_offered``), or the
                link stayed down longer than ``patience`` (``transfer.link_lost``).
        """
        wire.check_bundle_id(bundle_id)
        return self._fetch(bundle_id, list(dict.fromkeys(indices)))

    async def _fetch(self, bundle_id: str, todo: list[int]) -> AsyncIterator[tuple[int, bytes]]:
        wanted = set(todo)
        fetch = _Fetch(bundle_id, wanted)
        self._fetches.setdefault(bundle_id, []).append(fetch)
        queue = list(reversed(todo))  # pop() from the end: lowest indices first
        outstanding: dict[int, float] = {}  # index -> deadline (monotonic)
        down_since: float | None = None
        was_connected = self.client.connected
        try:
            while wanted:
                now = self.clock.monotonic()
                connected = self.client.connected
                if not connected:
                    down_since = down_since if down_since is not None else now
                    if now - down_since > self.patience:
                        raise TransferError(
                            f"link down for {now - down_since:.0f} s", code="transfer.link_lost"
                        )
                elif not was_connected:
                    # Back online: what the server already sent comes from the session; give it
                    # time before asking again, unless the broker forgot the session.
                    down_since = None
                    for index in outstanding:
                        outstanding[index] = (
                            0.0 if self._session_lost else now + self.request_timeout
                        )
                was_connected = connected
                if connected:
                    self._request_more(bundle_id, queue, outstanding, now)
                timeout = self._next_wake(outstanding, now, connected, bool(queue))
                try:
                    frame = await asyncio.wait_for(fetch.frames.get(), timeout)
                except TimeoutError:
                    continue
                result = self._accept(frame, wanted, outstanding)
                if result is not None:
                    yield result
        finally:
            fetches = self._fetches[bundle_id]
            fetches.remove(fetch)
            if not fetches:
                del self._fetches[bundle_id]

    def _request_more(
        self, bundle_id: str, queue: list[int], outstanding: dict[int, float], now: float
    ) -> None:
        expired = [i for i, deadline in outstanding.items() if deadline <= now]
        if expired:
            self.stats.re_requests += len(expired)
            for index in expired:
                outstanding[index] = now + self.request_timeout
            for start in range(0, len(expired), wire.MAX_FETCH_INDICES):
                self._request(bundle_id, expired[start : start + wire.MAX_FETCH_INDICES])
        # Pace requests, not arrivals: each request is charged the expected chunk size when it
        # leaves (corrected when the chunk arrives), so requests go out evenly at the cap and
        # the link never idles a round trip waiting for the bucket. ``window`` only bounds
        # what is in flight.
        # Refill in batches, once at least half the window is free (or the rest of the queue
        # fits): one fetch message then carries several indices instead of one per arrival,
        # which cut the gateway's CPU per chunk by a third (docs/benchmarks/transport.md). Each
        # index is still charged to the bucket on its own, so pacing is per chunk as before. On a
        # throttled link, waiting must not cost budget: once the bucket is full, what it would
        # bank next is lost, so requests go out then (without this the agent fell to 0.64 of
        # its cap beside a greedy flow, bench/transport_throttle.py).
        free = self.window - len(outstanding)
        if (
            outstanding
            and free < min(len(queue), (self.window + 1) // 2)
            and self._bucket_headroom(now) > 0
        ):
            return
        wall = self.clock.now()
        fresh: list[int] = []
        while queue and len(outstanding) < self.window:
            if self._bucket.delay(now, wall) > 0:
                break
            if self._size_estimate == 0 and outstanding:
                break  # one request until the first chunk tells us what a chunk costs
            index = queue.pop()
            outstanding[index] = now + self.request_timeout
            self._charged[(bundle_id, index)] = self._size_estimate
            self._bucket.reserve(self._size_estimate, now, wall)
            fresh.append(index)
        if fresh:
            self._request(bundle_id, fresh)

    def _bucket_headroom(self, now: float) -> float:
        """Seconds until the throttle's bucket is full (inf when unthrottled: never wasted)."""
        self._bucket.delay(now, self.clock.now())  # refill to ``now``
        bucket = self._bucket.bucket
        if bucket.rate <= 0:
            return float("inf")
        return max(0.0, (bucket.burst - bucket.tokens) / bucket.rate)

    def _next_wake(
        self, outstanding: dict[int, float], now: float, connected: bool, more: bool
    ) -> float:
        if not connected:
            return 0.5
        wake = min((d - now for d in outstanding.values()), default=self.request_timeout)
        if more and 0 < len(outstanding) < self.window:
            # A batch held back for a free half window goes out once the bucket is full (0:
            # nothing is held back for it, so no wake-up either).
            headroom = self._bucket_headroom(now)
            if headroom > 0:
                wake = min(wake, headroom)
        throttle = self._bucket.delay(now, self.clock.now())
        if throttle > 0:
            wake = min(wake, throttle) if outstanding else throttle
        return max(0.001, wake)

    def _accept(
        self, frame: wire.ChunkFrame, wanted: set[int], outstanding: dict[int, float]
    ) -> tuple[int, bytes] | None:
        if frame.status is wire.ChunkStatus.NOT_FOUND:
            raise TransferError(
                f"server does not offer chunk {frame.index} of {frame.bundle_id}",
                code="transfer.not_offered",
            )
        if frame.status is wire.ChunkStatus.REFUSED:
            # Over a server limit: ask again after the request timeout.
            self.stats.drops.drop(frame.data.decode(errors="replace")[:64] or "transfer.refused")
            if frame.index in outstanding:
                outstanding[frame.index] = self.clock.monotonic() + 1.0
            return None
        if frame.index not in wanted:
            self.stats.duplicate_chunks += 1
            self.stats.duplicate_bytes += len(frame.data)
            self.stats.drops.drop("transfer.duplicate")
            return None
        wanted.discard(frame.index)
        outstanding.pop(frame.index, None)
        self.stats.chunks += 1
        self.stats.chunk_bytes += len(frame.data)
        # Charge the difference between the real size and what the request was charged.
        charged = self._charged.pop((frame.bundle_id, frame.index), 0.0)
        self._bucket.reserve(len(frame.data) - charged, self.clock.monotonic(), self.clock.now())
        size = float(len(frame.data))
        self._size_estimate = (
            size if self._size_estimate == 0 else (0.8 * self._size_estimate + 0.2 * size)
        )
        return frame.index, frame.data
