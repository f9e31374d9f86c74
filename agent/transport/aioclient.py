"""paho-mqtt 2.x (MQTT v5) driven by asyncio: many clients on one event loop.

paho's own ``loop_start()`` runs one thread per client around ``select()``, which stalls past
~338 clients (file descriptors above 1024). Here each client's socket is registered with the
running asyncio loop (``add_reader``/``add_writer`` calling ``loop_read``/``loop_write``) and
one shared timer calls ``loop_misc`` for keepalives, so thousands of simulated devices, the
controller gateway and a site relay all run on one loop.

Rules:

* MQTT v5 only (under 3.1.1 an ACL-denied publish is acked as success).
* Connect and TLS handshake are blocking in paho, so they run in a worker thread; everything
  else (read, write, publish, subscribe, callbacks) runs on the loop thread.
* Reconnect forever with exponential backoff and full jitter, reset after a successful CONNACK.
* Persistent session by default (``clean_start=False`` + session expiry): QoS1 messages sent
  while the client was away are delivered when it returns.
* ``publish`` returns an awaitable that resolves with the PUBACK reason code (0 success,
  135 not authorized, ...); callers that don't care don't await it.

    client = AsyncMqttClient(MqttSettings(host="127.0.0.1", port=1883, client_id="dev-1"),
                             on_message=handle)
    await client.start()
    await client.publish("slotline/v1/dev/dev-1/state", b"{}", qos=1, retain=True)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqttc
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

_RETAINED_ONLY_ID = 1_000_001
MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained
ConnectHandler = Callable[[bool], None]  # session_present


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: the CA that signed the broker, our certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A client TLS context verifying the broker against ``ca``."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker when the client vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to connect."""

    host: str
    port: int
    client_id: str
    tls: TlsFiles | None = None
    tls_hostname_check: bool = True
    keepalive: int = 30
    clean_start: bool = False
    session_expiry: int = 7 * 24 * 3600
    will: Will | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    connect_timeout: float = 10.0
    max_inflight: int = 64
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str, client_id: str, **kwargs: Any) -> MqttSettings:
        """``mqtt://host:port`` or ``mqtts://host:port`` (TLS needs ``tls=`` in kwargs)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ValueError(f"broker URL {url!r} is not mqtt://host:port or mqtts://host:port")
        port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        return cls(host=parsed.hostname, port=port, client_id=client_id, **kwargs)


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2**attempt)].

    Full jitter spreads a fleet that lost its broker at the same instant, so the broker is not
    hit by every device again at the same instant when it returns.
    """
    return rng.uniform(0.0, min(maximum, initial * (2 ** min(attempt, 30))))


class _Ticker:
    """One ``loop_misc`` timer per event loop for all clients on it (keepalive, timeouts)."""

    _by_loop: dict[int, _Ticker] = {}  # noqa: RUF012 - one registry per process on purpose

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clients: set[mqttc.Client] = set()
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Ticker:
        ticker = cls._by_loop.get(id(loop))
        if ticker is None or ticker.loop is not loop:
            ticker = cls(loop)
            cls._by_loop[id(loop)] = ticker
        return ticker

    def add(self, client: mqttc.Client) -> None:
        self.clients.add(client)
        if self.handle is None:
            self.handle = self.loop.call_later(1.0, self._tick)

    def discard(self, client: mqttc.Client) -> None:
        self.clients.discard(client)

    def _tick(self) -> None:
        for client in list(self.clients):
            with contextlib.suppress(Exception):
                client.loop_misc()
        if self.clients:
            self.handle = self.loop.call_later(1.0, self._tick)
        else:
            self.handle = None
            self._by_loop.pop(id(self.loop), None)


@dataclass
class ClientStats:
    """Counters of one client's life (reported by benchmarks and ``slotline relay``)."""

    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    last_error: str = ""
    received: int = 0
    published: int = 0
    denied: int = 0  # PUBACK reason >= 128 (v5): the broker refused a publish
    reason_codes: dict[int, int] = field(default_factory=dict)


class AsyncMqttClient:
    """One MQTT v5 client on the running asyncio loop, reconnecting in the background."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_message: MessageHandler | None = None,
        on_connect: ConnectHandler | None = None,
        on_disconnect: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.stats = ClientStats()
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._writing = False  # add_writer is registered: waiting for the socket to drain
        self._flush_pending = False  # a _flush is scheduled with call_soon
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._pub_waiters: dict[int, asyncio.Future[int]] = {}
        self._sub_waiters: dict[int, asyncio.Future[list[int]]] = {}
        self._client = self._make_client()

    # ------------------------------------------------------------------ paho setup

    def _make_client(self) -> mqttc.Client:
        s = self.settings
        client = mqttc.Client(
            CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=mqttc.MQTTv5
        )
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        client.suppress_exceptions = True
        client.reconnect_delay_set(1, 1)
        client.connect_timeout = s.connect_timeout
        if s.tls is not None:
            ctx = s.tls.context()
            ctx.check_hostname = s.tls_hostname_check
            client.tls_set_context(ctx)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, s.will.qos, retain=s.will.retain)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.on_subscribe = self._paho_subscribe
        client.on_socket_open = self._sock_open
        client.on_socket_close = self._sock_close
        client.on_socket_register_write = self._sock_want_write
        client.on_socket_unregister_write = self._sock_done_write
        return client

    @property
    def connected(self) -> bool:
        """Whether a CONNACK with success has been received and the link is up."""
        return self._connected.is_set()

    @property
    def paho(self) -> mqttc.Client:
        """The underlying paho client (for options this wrapper does not expose)."""
        return self._client

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        if self._supervisor is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._supervisor = self._loop.create_task(self._supervise(), name=self.settings.client_id)

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected; False on timeout."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, *, disconnect: bool = True) -> None:
        """Stop reconnecting and close.

        ``disconnect=False`` drops the link like a power cut (the broker then publishes our will).
        """
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        if disconnect and self.connected:
            self._client.disconnect()
            # flush the DISCONNECT packet
            with contextlib.suppress(Exception):
                self._client.loop_write()
        self._drop_socket()
        self._fail_waiters()

    def drop_link(self) -> None:
        """Close the socket abruptly (tests, benchmarks: a cut link). Reconnection follows."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def _supervise(self) -> None:
        attempt = 0
        loop = asyncio.get_running_loop()
        s = self.settings
        while not self._stopping:
            self._lost.clear()
            try:
                await loop.run_in_executor(None, self._blocking_connect)
            except Exception as e:
                self.stats.connect_failures += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                delay = backoff_delay(attempt, s.backoff_initial, s.backoff_max, self._rng)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            _Ticker.of(loop).add(self._client)
            # Wait for CONNACK or loss.
            connack = asyncio.ensure_future(self._connected.wait())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait(
                    {connack, lost}, timeout=s.connect_timeout, return_when="FIRST_COMPLETED"
                )
            finally:
                connack.cancel()
                lost.cancel()
            if self._connected.is_set():
                attempt = 0
                await self._lost.wait()
            else:
                self.stats.connect_failures += 1
                self._drop_socket()
            _Ticker.of(loop).discard(self._client)
            if self._stopping:
                return
            delay = backoff_delay(attempt, s.backoff_initial, s.backoff_max, self._rng)
            attempt += 1
            await asyncio.sleep(delay)

    def _blocking_connect(self) -> None:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry
        rc = self._client.connect(
            s.host, s.port, keepalive=s.keepalive, clean_start=s.clean_start, properties=props
        )
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(mqttc.error_string(rc))

    # ------------------------------------------------------------------ socket plumbing

    def _in_loop(self) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def _call(self, fn: Callable[[], None]) -> None:
        if self._loop is None:
            return
        if self._in_loop():
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _sock_open(self, _c: mqttc.Client, _u: Any, sock: Any) -> None:
        fd = sock.fileno()
        # paho leaves Nagle on: a small fetch request then waits for the delayed ACK of the
        # previous one (~40 ms a round trip on loopback). Requests must leave at once.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def register() -> None:
            if self._loop is None or self._stopping:
                return
            self._fd = fd
            self._loop.add_reader(fd, self._read)

        self._call(register)

    def _sock_close(self, _c: mqttc.Client, _u: Any, sock: Any) -> None:
        del sock
        # On the loop thread this runs synchronously, before the fd number can be reused.
        self._call(self._unregister)

    def _unregister(self) -> None:
        if self._loop is not None and self._fd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        self._fd = None
        self._writing = False

    def _sock_want_write(self, _c: mqttc.Client, _u: Any, sock: Any) -> None:
        del sock
        # Flush on the next loop iteration rather than through add_writer/remove_writer: the
        # socket is nearly always writable, and every packet queued in this iteration (a burst
        # of chunk publishes, the PUBACKs of what was just read) goes out in that one flush
        # without two epoll_ctl calls and an extra poll per write cycle. Only a full socket
        # buffer falls back to waiting for writability (``_flush``).
        if self._in_loop():
            self._schedule_flush()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._schedule_flush)

    def _schedule_flush(self) -> None:
        if self._loop is not None and self._fd is not None and not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._fd is None or self._writing:
            return  # closed meanwhile, or already waiting for writability
        self._write()
        if self._fd is not None and self._loop is not None and self._client.want_write():
            # The kernel buffer is full: wait until the socket drains.
            self._writing = True
            self._loop.add_writer(self._fd, self._write)

    def _sock_done_write(self, _c: mqttc.Client, _u: Any, sock: Any) -> None:
        del sock

        def unregister() -> None:
            if self._loop is not None and self._fd is not None and self._writing:
                self._writing = False
                self._loop.remove_writer(self._fd)

        self._call(unregister)

    def _read(self) -> None:
        rc = self._client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._link_lost(mqttc.error_string(rc))
            return
        # TLS may hold decrypted bytes the selector cannot see: read again without waiting.
        sock = self._client.socket()
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0 and self._loop is not None:
            self._loop.call_soon(self._read)

    def _write(self) -> None:
        rc = self._client.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._link_lost(mqttc.error_string(rc))

    def _drop_socket(self) -> None:
        self._unregister()
        with contextlib.suppress(Exception):
            self._client._sock_close()  # noqa: SLF001 - paho has no public "close now"

    def _link_lost(self, reason: str) -> None:
        self.stats.last_error = reason
        self._drop_socket()
        if self._connected.is_set():
            self._connected.clear()
            self.stats.disconnects += 1
            if self._on_disconnect is not None:
                self._on_disconnect()
        self._lost.set()

    # ------------------------------------------------------------------ paho callbacks

    def _paho_connect(self, _c: mqttc.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.stats.last_error = f"CONNACK {reason}"
            self._defer_lost(str(reason))
            return
        self.stats.connects += 1
        self._connected.set()
        if self._on_connect is not None:
            self._on_connect(bool(flags.session_present))

    def _paho_disconnect(self, _c: mqttc.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._defer_lost(f"disconnected: {reason}")

    def _defer_lost(self, reason: str) -> None:
        # paho holds its (non-reentrant) callback lock here; closing the socket now would take
        # it again and deadlock, so finish on the next loop iteration.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._link_lost, reason)

    def _paho_message(self, _c: mqttc.Client, _u: Any, msg: mqttc.MQTTMessage) -> None:
        self.stats.received += 1
        sub_ids = getattr(msg.properties, "SubscriptionIdentifier", None) or []
        if _RETAINED_ONLY_ID in sub_ids and not msg.retain:
            return  # the live copy comes through the regular subscription
        if self._on_message is not None:
            try:
                self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:
                # A handler bug must not kill the link; handlers count their own drops.
                log.exception("message handler failed on %s", msg.topic)

    def _paho_publish(self, _c: mqttc.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        code = int(reason.value) if hasattr(reason, "value") else int(reason)
        self.stats.reason_codes[code] = self.stats.reason_codes.get(code, 0) + 1
        if code >= 128:
            self.stats.denied += 1
        fut = self._pub_waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(code)

    def _paho_subscribe(self, _c: mqttc.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        fut = self._sub_waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([int(r.value) for r in reasons])

    def _fail_waiters(self) -> None:
        for waiters in (self._pub_waiters, self._sub_waiters):
            for fut in waiters.values():
                if not fut.done():
                    fut.cancel()
            waiters.clear()

    # ------------------------------------------------------------------ operations

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> asyncio.Future[int]:
        """Queue a publish (sent now or after reconnect); the future gets the PUBACK reason.

        Must be called on the loop thread. QoS0 futures resolve at once with 0.
        """
        if self._loop is None:
            raise RuntimeError("publish before start()")
        fut: asyncio.Future[int] = self._loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        self.stats.published += 1
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            fut.set_exception(ConnectionError(mqttc.error_string(info.rc)))
        elif qos == 0:
            fut.set_result(0)
        else:
            self._pub_waiters[info.mid] = fut
        return fut

    async def subscribe(
        self, filters: list[tuple[str, int]], *, retained_only: bool = False
    ) -> list[int]:
        """Subscribe and wait for the SUBACK reason codes (granted QoS or >= 128 refused).

        A v5 SUBACK may grant a filter the ACL then never delivers on (Mosquitto 2.0):
        denial is observable only by delivery. ``retained_only`` tags the subscription with a
        subscription identifier and passes on only the retained messages it brings (reading the
        retained state once beside shared subscriptions, which get none, without live
        duplicates).
        """
        if self._loop is None:
            raise RuntimeError("subscribe before start()")
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        props = None
        if retained_only:
            props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
            props.SubscriptionIdentifier = _RETAINED_ONLY_ID
        rc, mid = self._client.subscribe(filters, properties=props)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(mqttc.error_string(rc))
        self._sub_waiters[mid] = fut
        return await fut
