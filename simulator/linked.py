"""A ``Transport`` seen through a site's link: the real MQTT transport, delayed and cut.

Rules:
- Wraps any ``agent.ports.Transport`` (in runs: the agent's real MQTT transport) and asks the
  site's pure ``Link`` when each message would arrive; it then sleeps until then. Nothing is
  re-implemented: commands, state, events and chunks still go through the real broker.
- Uplink messages (state, events) wait for the link to come back when it is down, as MQTT QoS1
  in a persistent session does; a chunk lost to an outage ends ``fetch_chunks`` with
  ``TransferError``, so the agent resumes from its first missing chunk, as after a real cut.
- Commands arrive late, never lost (the broker holds them in the device's session).
- ``reachable`` is false while the link is down.
- Behind a site relay (``chunks_over_lan``) a device's chunk fetches go to the relay over the
  site LAN, unshaped and counted as LAN bytes; its control traffic still crosses the WAN (the
  site broker's bridge). The relay's own upstream transport is wrapped with the site's ``Link``,
  so the WAN carries exactly what the relay fetched.

Times are seconds since the run started (``RunClock.elapsed``), so one ``Link`` serves every
device of a site on one event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from agent.ports import Transport
from firmware_bundles.errors import TransferError
from simulator.link import Link

MQTT_OVERHEAD = 40  # fixed header, topic and properties of a small publish, roughly


class LinkedTransport:
    """``agent.ports.Transport`` through a modelled ``Link``."""

    # MQTT messages carried by every LinkedTransport of this process (report: messages/s).
    total_messages = 0

    def __init__(self, inner: Transport, link: Link, elapsed: Callable[[], float], *,
                 chunks_over_lan: bool = False) -> None:
        self.inner = inner
        self.link = link
        self._elapsed = elapsed
        self._chunks_over_lan = chunks_over_lan
        self._started = False

    async def _wait_until(self, t: float) -> None:
        delay = t - self._elapsed()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _carry(self, nbytes: int) -> None:
        # Keep trying until the message makes it: QoS1 in a persistent session re-sends after
        # the reconnect. Bounded: an outage schedule is finite.
        for _ in range(10_000):
            now = self._elapsed()
            arrival = self.link.send(now, nbytes + MQTT_OVERHEAD)
            if arrival is not None:
                LinkedTransport.total_messages += 1
                await self._wait_until(arrival)
                return
            await self._wait_until(self.link.next_up(now) + 0.01)
        raise TransferError("link never came back")

    async def start(self) -> None:
        """Connect the inner transport once the link is up (idempotent)."""
        if self._started:
            return
        self._started = True
        await self._wait_until(self.link.next_up(self._elapsed()))
        await self.inner.start()

    async def stop(self) -> None:
        """Disconnect the inner transport."""
        self._started = False
        await self.inner.stop()

    async def commands(self) -> AsyncIterator[bytes]:
        """Commands as the broker delivers them, late by the link."""
        async for raw in self.inner.commands():
            await self._carry(len(raw))
            yield raw

    async def publish_state(self, state: Mapping[str, Any]) -> None:
        """Publish the retained state after the link carried it."""
        await self._carry(_size(state))
        await self.inner.publish_state(state)

    async def publish_event(self, event: Mapping[str, Any]) -> None:
        """Publish an event after the link carried it."""
        await self._carry(_size(event))
        await self.inner.publish_event(event)

    async def fetch_chunks(
        self, bundle_id: str, indices: list[int]
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Chunks as the link would deliver them; an outage ends the fetch with TransferError."""
        if self._chunks_over_lan:
            async for index, data in self.inner.fetch_chunks(bundle_id, indices):
                self.link.stats.lan_bytes += len(data)
                yield index, data
            return
        now = self._elapsed()
        if not self.link.up(now):
            raise TransferError("site link is down")
        # The request itself crosses the link first.
        await self._carry(16 * len(indices))
        async for index, data in self.inner.fetch_chunks(bundle_id, indices):
            arrival = self.link.send_chunk(self._elapsed(), len(data))
            if arrival is None:
                raise TransferError(f"site link lost chunk {index} of {bundle_id}")
            LinkedTransport.total_messages += 1
            await self._wait_until(arrival)
            yield index, data

    async def reachable(self, timeout: float) -> bool:
        """False while the link is down; else what the inner transport says."""
        if not self.link.up(self._elapsed()):
            await asyncio.sleep(min(timeout, max(0.0, self.link.next_up(self._elapsed())
                                                 - self._elapsed())))
            if not self.link.up(self._elapsed()):
                return False
        return await self.inner.reachable(timeout)

    def __getattr__(self, name: str) -> Any:
        # Adapter extras (stats, verifier hooks) stay reachable through the wrapper.
        return getattr(self.inner, name)


def _size(doc: Mapping[str, Any]) -> int:
    return len(json.dumps(doc, separators=(",", ":"), default=str))
