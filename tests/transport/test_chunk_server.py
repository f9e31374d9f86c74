"""The chunk server's slot accounting, without a broker where none is needed."""

from __future__ import annotations

import asyncio

from transport_timing import StepClock, until

from agent.transport.aioclient import AsyncMqttClient, MqttSettings
from agent.transport.broker import free_port
from agent.transport.serving import ChunkServer, ServingLimits
from firmware_bundles import protocol as wire


def test_a_chunk_whose_puback_never_comes_frees_its_slot_after_the_ack_timeout() -> None:
    """Slots are released by PUBACK callbacks now, not by a wait_for per chunk: a link that
    never comes back must still not pin the server's only slot forever."""

    async def run() -> None:
        # Nothing listens on this port: publishes queue in paho and are never acknowledged.
        settings = MqttSettings(
            "127.0.0.1", free_port(), "server-noack", backoff_initial=5.0, backoff_max=5.0
        )
        client = AsyncMqttClient(settings)
        await client.start()
        clock = StepClock()
        served: list[int] = []

        def resolve(device_id: str, bundle_id: str, index: int) -> bytes:
            served.append(index)
            return b"x"

        server = ChunkServer(
            client,
            resolve,
            site_of=lambda _d: None,
            clock=clock,
            limits=ServingLimits(max_unacked=1, ack_timeout=4.0),
        )
        server.start()
        req = wire.FetchRequest(wire.FetchOp.CHUNKS, "r", "b1", (0, 1))
        server.on_fetch("dev-a", wire.encode_fetch(req))
        await until(lambda: served == [0])
        for _ in range(50):
            await asyncio.sleep(0)
        assert served == [0], "the only slot awaits chunk 0's PUBACK"
        clock.t += 5.0
        await until(lambda: served == [0, 1])
        await server.stop()
        await client.stop()

    asyncio.run(run())


def test_async_and_plain_resolvers_are_both_served_and_count_not_found() -> None:
    async def run(resolver_kind: str) -> tuple[int, int]:
        settings = MqttSettings("127.0.0.1", free_port(), f"server-{resolver_kind}")
        client = AsyncMqttClient(settings)
        await client.start()

        def plain(device_id: str, bundle_id: str, index: int) -> bytes | None:
            return b"x" if index == 0 else None

        async def coro(device_id: str, bundle_id: str, index: int) -> bytes | None:
            await asyncio.sleep(0)
            return plain(device_id, bundle_id, index)

        server = ChunkServer(
            client,
            plain if resolver_kind == "plain" else coro,
            site_of=lambda _d: None,
            clock=StepClock(),
        )
        server.start()
        req = wire.FetchRequest(wire.FetchOp.CHUNKS, "r", "b1", (0, 1))
        server.on_fetch("dev-a", wire.encode_fetch(req))
        await until(lambda: server.stats.served + server.stats.not_found == 2)
        await server.stop()
        await client.stop()
        return server.stats.served, server.stats.not_found

    assert asyncio.run(run("plain")) == (1, 1)
    assert asyncio.run(run("async")) == (1, 1)
