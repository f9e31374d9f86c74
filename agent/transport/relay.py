"""The site relay: one WAN copy of each chunk, served to every device at the site.

A relay runs on a box at the site beside a site broker (Mosquitto). The site broker bridges the
control channels (``cmd`` in; ``state``, ``events``, ``online`` out) to the central broker
(``packaging/mosquitto/site-mosquitto.conf``); ``fetch`` and ``chunk`` stay local. The relay
answers the site devices' ``fetch`` from its chunk cache, and fetches each missing chunk once from
the central gateway under its own identity ``relay-<site>`` (a device id on the central broker:
the controller's ``ChunkSource`` must offer it the bundles offered to the site).

Rules:

* Untrusted mirror: the relay never verifies or signs anything; devices check every chunk
  against the release-signed table, so a relay can delay or drop, never alter undetected.
* Concurrent requests for the same missing chunk wait on one upstream fetch (no double WAN copy).
* The cache is the bundles library's ``ChunkStore`` (content-addressed, re-verified on read)
  plus an index ``(bundle, index) -> sha256``; a power cut leaves no torn chunk or index.
* The WAN fetch is paced by the site's link profile (token bucket, time-of-day windows).
  ``wan=`` wraps the upstream transport (the fleet simulator puts its site link model there).

    relay = SiteRelay("plant-7", local=MqttSettings(...), upstream=MqttSettings(...),
                      cache_dir=Path("/var/lib/slotline/relay"))
    await relay.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.mqtt import MqttTransport, SystemClock
from agent.ports import Clock, Transport
from agent.transport.aioclient import AsyncMqttClient, MqttSettings
from agent.transport.serving import ChunkServer, ServingLimits
from firmware_bundles import protocol as wire
from firmware_bundles.chunkstore import ChunkStore
from firmware_bundles.errors import BundleError, TransferError
from firmware_bundles.throttle import UNLIMITED, LinkProfile


class ChunkCache:
    """The relay's cache: the content-addressed ``ChunkStore`` plus a ``(bundle, index)`` index.

    The store re-verifies every read and writes crash-safely; index files are written atomically.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = ChunkStore(directory / "chunks")
        (directory / "index").mkdir(parents=True, exist_ok=True)

    def _index_path(self, bundle_id: str, index: int) -> Path:
        return self.directory / "index" / wire.check_bundle_id(bundle_id) / str(index)

    def get(self, bundle_id: str, index: int) -> bytes | None:
        """Cached bytes, or None. A chunk that no longer hashes right counts as missing."""
        try:
            digest = self._index_path(bundle_id, index).read_text().strip()
            return self.store.get(digest)
        except (OSError, KeyError, BundleError):
            return None

    def put(self, bundle_id: str, index: int, data: bytes) -> str:
        """Store a chunk; returns its SHA-256."""
        digest = self.store.put(data)
        path = self._index_path(bundle_id, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            f.write(digest.encode())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return digest


@dataclass
class RelayStats:
    """What the relay did: cache hits, WAN fetches and bytes."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    wan_chunks: int = 0
    wan_bytes: int = 0
    wan_errors: int = 0


class SiteRelay:
    """Serve a site's devices from a cache filled once over the WAN."""

    def __init__(
        self,
        site: str,
        *,
        local: MqttSettings,
        upstream: MqttSettings,
        cache_dir: Path,
        relay_id: str | None = None,
        wan_profile: LinkProfile = UNLIMITED,
        clock: Clock | None = None,
        limits: ServingLimits | None = None,
        upstream_window: int = 8,
        wan: Callable[[MqttTransport], Transport] | None = None,
    ) -> None:
        self.site = site
        self.clock: Clock = clock or SystemClock()
        self.relay_id = wire.check_device_id(relay_id or wire.relay_id(site))
        self.cache = ChunkCache(cache_dir)
        self.stats = RelayStats()
        self.upstream = MqttTransport(
            self.relay_id,
            upstream,
            clock=self.clock,
            profile=wan_profile,
            window=upstream_window,
        )
        # What chunk fetches go through: the upstream client, or a wrapper that shapes it.
        self._wan: Transport = wan(self.upstream) if wan is not None else self.upstream
        self.local = AsyncMqttClient(local, on_message=self._on_local, on_connect=self._on_connect)
        self.server = ChunkServer(
            self.local, self._resolve, site_of=lambda _d: None, clock=self.clock, limits=limits
        )
        self._inflight: dict[tuple[str, int], asyncio.Future[bytes | None]] = {}
        self._bg: set[asyncio.Task[list[int]]] = set()

    async def start(self) -> None:
        """Connect both sides and start serving."""
        await self._wan.start()
        await self.local.start()
        self.server.start()

    async def stop(self) -> None:
        """Stop serving and disconnect both sides."""
        await self.server.stop()
        await self.local.stop()
        await self._wan.stop()

    def _on_connect(self, session_present: bool) -> None:
        del session_present
        task = asyncio.ensure_future(
            self.local.subscribe([(wire.device_filter(wire.Channel.FETCH), 1)])
        )
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _on_local(self, topic: str, payload: bytes, retained: bool) -> None:
        del retained
        try:
            device_id, channel = wire.parse_topic(topic)
        except BundleError as e:
            self.server.stats.drops.drop(e.code)
            return
        if channel is wire.Channel.FETCH:
            self.server.on_fetch(device_id, payload)

    async def _resolve(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        del device_id
        cached = self.cache.get(bundle_id, index)
        if cached is not None:
            self.stats.hits += 1
            return cached
        key = (bundle_id, index)
        pending = self._inflight.get(key)
        if pending is not None:
            self.stats.coalesced += 1
            return await asyncio.shield(pending)
        self.stats.misses += 1
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            data = await self._fetch_upstream(bundle_id, index)
            fut.set_result(data)
        except BaseException:
            fut.set_result(None)
            raise
        finally:
            del self._inflight[key]
        return data

    async def _fetch_upstream(self, bundle_id: str, index: int) -> bytes | None:
        try:
            async for got, data in self._wan.fetch_chunks(bundle_id, [index]):
                if got == index:
                    self.cache.put(bundle_id, index, data)
                    self.stats.wan_chunks += 1
                    self.stats.wan_bytes += len(data)
                    return data
        except TransferError as e:
            self.stats.wan_errors += 1
            if e.code == "transfer.not_offered":
                return None  # the device hears NOT_FOUND, as from the controller
            # WAN down or slow: the device hears REFUSED and asks again later.
            raise TransferError(str(e), code="transfer.unavailable") from e
        return None

    async def run_forever(self) -> None:
        """Run until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await self.stop()
