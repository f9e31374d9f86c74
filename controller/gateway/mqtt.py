"""The controller side of the wire: publish signed commands, take in device traffic, serve chunks.

Rules:

* Implements ``controller.ports.DeviceGateway``: ``publish_command`` queues a QoS1 publish on
  ``slotline/v1/dev/<id>/cmd`` (not retained: a command is delivered once per session, never to a
  device that resubscribes later). Safe to call from any thread (FastAPI's sync endpoints).
* Subscribes with shared subscriptions (``$share/<group>/slotline/v1/dev/+/<channel>``) for
  ``state``, ``events``, ``fetch`` and ``online``, so controller replicas split the load
  (``fetch`` at QoS0: see ``_SUB_QOS``). Shared
  subscriptions get no retained messages (MQTT v5), so at start the gateway also reads the
  retained ``state`` and ``online`` once with a plain subscription, then drops it.
* Every inbound message: topic parsed (the device id comes from the topic, which the broker ACL
  ties to the certificate), size-capped, schema-validated, then handed to the ``ControllerInbox``.
  Malformed messages are counted by stable code and dropped (logged at DEBUG with topic, error and
  payload head, which names the sender's bug); an inbox exception is logged and counted, never
  kills the gateway.
* ``events`` are rate-limited per device (a token bucket in messages): a flooding device loses
  its excess events, the others are unaffected. ``fetch`` goes to the ``ChunkServer`` (per-device
  limits, round-robin, per-site budget).

    gateway = MqttGateway(MqttSettings.from_url(url, "controller-1"), inbox, chunk_source)
    await gateway.start()
    gateway.publish_command("dev-1", signed_command_bytes)
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from agent.adapters.mqtt import SystemClock
from agent.ports import Clock
from agent.transport.aioclient import AsyncMqttClient, MqttSettings
from agent.transport.serving import ChunkServer, ServingLimits, ServingStats
from controller.ports import ChunkSource, ControllerInbox
from firmware_bundles import protocol as wire
from firmware_bundles.errors import BundleError
from firmware_bundles.throttle import SiteBudgets, TokenBucket

log = logging.getLogger(__name__)

_INBOUND = (wire.Channel.STATE, wire.Channel.EVENTS, wire.Channel.FETCH, wire.Channel.ONLINE)
# ``fetch`` is taken in at QoS0: the broker still acknowledges the device's QoS1 publish (and
# refuses it with reason 135 under the ACL), but the gateway sends no PUBACK per request, one
# packet and one syscall less per served chunk (docs/benchmarks/transport.md). Nothing is lost
# that QoS1 would keep: the request queue lives in the chunk server's memory and is forgotten
# on a restart anyway, and a device re-asks for what does not arrive within its timeout.
_SUB_QOS = {
    wire.Channel.STATE: 1,
    wire.Channel.EVENTS: 1,
    wire.Channel.FETCH: 0,
    wire.Channel.ONLINE: 1,
}


@dataclass(frozen=True)
class GatewayLimits:
    """Per-device limits on inbound traffic."""

    event_rate: float = 20.0  # events per second per device
    event_burst: float = 50.0
    serving: ServingLimits = field(default_factory=ServingLimits)


@dataclass
class GatewayStats:
    """Counters of the gateway (drops by stable code, traffic by channel)."""

    drops: wire.DropCounter = field(default_factory=wire.DropCounter)
    received: dict[str, int] = field(default_factory=dict)
    commands: int = 0
    inbox_errors: int = 0


class MqttGateway:
    """``DeviceGateway`` over MQTT v5, with the chunk server for ``fetch``."""

    def __init__(
        self,
        settings: MqttSettings,
        inbox: ControllerInbox,
        chunks: ChunkSource,
        *,
        share_group: str = wire.DEFAULT_SHARE_GROUP,
        budgets: SiteBudgets | None = None,
        limits: GatewayLimits | None = None,
        clock: Clock | None = None,
        read_retained: bool = True,
    ) -> None:
        self.inbox = inbox
        self.chunks = chunks
        self.share_group = share_group
        self.limits = limits or GatewayLimits()
        self.clock: Clock = clock or SystemClock()
        self.read_retained = read_retained
        self.stats = GatewayStats()
        self.client = AsyncMqttClient(
            settings, on_message=self._on_message, on_connect=self._on_connect
        )
        self.server = ChunkServer(
            self.client,
            # A plain function: the store answers at once, so no task per chunk.
            chunks.resolve_chunk,
            site_of=chunks.site_of,
            clock=self.clock,
            budgets=budgets,
            limits=self.limits.serving,
        )
        self._event_buckets: dict[str, TokenBucket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retained_done = False
        self._subscribed = asyncio.Event()
        self._bg: set[asyncio.Task[None]] = set()

    @property
    def serving_stats(self) -> ServingStats:
        """The chunk server's counters."""
        return self.server.stats

    async def start(self) -> None:
        """Connect, subscribe, start serving chunks."""
        self._loop = asyncio.get_running_loop()
        await self.client.start()
        self.server.start()

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until connected, subscribed, and the retained state and presence are read.

        Before that, a device's live report could reach the broker ahead of our subscription
        and be seen by nobody (shared subscriptions get no retained copies).
        """
        try:
            async with asyncio.timeout(timeout):
                await self._subscribed.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop serving and disconnect."""
        await self.server.stop()
        await self.client.stop()

    def _on_connect(self, session_present: bool) -> None:
        del session_present
        task = asyncio.ensure_future(self._subscribe())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _subscribe(self) -> None:
        filters = [(wire.shared_filter(ch, self.share_group), _SUB_QOS[ch]) for ch in _INBOUND]
        await self.client.subscribe(filters)
        if self.read_retained and not self._retained_done:
            self._retained_done = True
            plain = [
                wire.device_filter(wire.Channel.STATE),
                wire.device_filter(wire.Channel.ONLINE),
            ]
            await self.client.subscribe([(f, 1) for f in plain], retained_only=True)
            # Retained messages arrive right after the SUBACK; the plain subscription's live
            # copies are dropped by the client meanwhile. Then stop it.
            await asyncio.sleep(2.0)
            self.client.paho.unsubscribe(plain)
        self._subscribed.set()

    # ------------------------------------------------------------------ outbound

    def publish_command(self, device_id: str, command: bytes) -> None:
        """Queue one signed command for a device (QoS1). Thread-safe."""
        topic = wire.device_topic(device_id, wire.Channel.CMD)
        wire.check_size(wire.Channel.CMD, command)
        loop = self._loop
        if loop is None:
            raise RuntimeError("publish_command before start()")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        self.stats.commands += 1
        if running is loop:
            self.client.publish(topic, command)
        else:
            loop.call_soon_threadsafe(lambda: self.client.publish(topic, command) and None)

    # ------------------------------------------------------------------ inbound

    def _event_allowed(self, device_id: str) -> bool:
        bucket = self._event_buckets.get(device_id)
        if bucket is None:
            bucket = TokenBucket(self.limits.event_rate, self.limits.event_burst)
            self._event_buckets[device_id] = bucket
        return bucket.reserve(1, self.clock.monotonic()) <= 0

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        del retained
        try:
            device_id, channel = wire.parse_topic(topic)
        except BundleError as e:
            self._drop(topic, payload, e)
            return
        self.stats.received[channel.value] = self.stats.received.get(channel.value, 0) + 1
        try:
            if channel is wire.Channel.FETCH:
                self.server.on_fetch(device_id, payload)
            elif channel is wire.Channel.EVENTS:
                if not self._event_allowed(device_id):
                    self.stats.drops.drop("transfer.rate_limited")
                    return
                self.inbox.on_event(device_id, wire.decode_document(channel, payload))
            elif channel is wire.Channel.STATE:
                if payload == b"":
                    return  # retained state cleared (device deleted)
                self.inbox.on_state(device_id, wire.decode_document(channel, payload))
            elif channel is wire.Channel.ONLINE:
                self.inbox.on_online(device_id, wire.decode_online(payload))
            else:
                self.stats.drops.drop("protocol.topic_invalid")
        except BundleError as e:
            self._drop(topic, payload, e)
        except Exception:
            self.stats.inbox_errors += 1
            log.exception("inbox failed on %s", topic)

    def _drop(self, topic: str, payload: bytes, error: BundleError) -> None:
        self.stats.drops.drop(error.code)
        # DEBUG, not WARNING: a flooding device must not flood the log too.
        log.debug("dropped %s (%s: %s): %r", topic, error.code, error, payload[:120])
