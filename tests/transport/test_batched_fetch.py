"""Batched fetches: the agent asks for several chunks per message; the gateway takes both forms."""

from __future__ import annotations

import asyncio
import json

import pytest
from transport_timing import StepClock, until

from agent.adapters.mqtt import MqttTransport
from agent.transport.aioclient import AsyncMqttClient, MqttSettings
from controller.gateway import MqttGateway
from firmware_bundles import protocol as wire
from firmware_bundles.throttle import LinkProfile

pytestmark = pytest.mark.broker

CHUNK = 4 * 1024


class Chunks:
    def __init__(self, n: int) -> None:
        self.data = [bytes([i % 251]) * CHUNK for i in range(n)]

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        return self.data[index] if bundle_id == "b1" and index < len(self.data) else None

    def site_of(self, device_id: str) -> str | None:
        return None


class Inbox:
    def on_state(self, device_id, state) -> None:
        pass

    def on_event(self, device_id, event) -> None:
        pass

    def on_online(self, device_id, online) -> None:
        pass


def _settings(broker, client_id: str) -> MqttSettings:
    return MqttSettings(broker.host, broker.port, client_id, backoff_initial=0.05, backoff_max=0.3)


async def _gateway(broker, chunks: Chunks, tag: str) -> MqttGateway:
    gateway = MqttGateway(_settings(broker, f"controller-{tag}"), Inbox(), chunks)
    await gateway.start()
    assert await gateway.wait_ready(5)
    await asyncio.sleep(0.2)
    return gateway


def test_agent_asks_for_several_chunks_per_fetch_message(plain_broker) -> None:
    n, window = 64, 8
    chunks = Chunks(n)

    async def run() -> tuple[dict[int, bytes], int]:
        gateway = await _gateway(plain_broker, chunks, "batch")
        device = MqttTransport(
            "dev-batch-1", _settings(plain_broker, "dev-batch-1"), window=window
        )
        await device.start()
        assert await device.client.wait_connected(5)
        assert await device.reachable(5)
        before = gateway.serving_stats.requests
        got = {i: d async for i, d in device.fetch_chunks("b1", list(range(n)))}
        fetches = gateway.serving_stats.requests - before
        await device.stop()
        await gateway.stop()
        return got, fetches

    got, fetches = asyncio.run(run())
    assert got == dict(enumerate(chunks.data))
    # One request for the first chunk (its size sets the throttle's estimate), then refills of at
    # least half the window: one message per arriving chunk would be ~n.
    assert fetches <= 1 + -(-(n - 1) // (window // 2)), fetches


def test_gateway_serves_a_multi_index_fetch_and_a_single_index_one(plain_broker) -> None:
    chunks = Chunks(12)
    device_id = "dev-batch-raw"

    async def run() -> dict[int, bytes]:
        gateway = await _gateway(plain_broker, chunks, "raw")
        frames: dict[int, bytes] = {}

        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            frame = wire.decode_chunk(payload)
            if frame.status is wire.ChunkStatus.OK:
                frames[frame.index] = frame.data

        client = AsyncMqttClient(_settings(plain_broker, device_id), on_message=on_message)
        await client.start()
        assert await client.wait_connected(5)
        await client.subscribe([(wire.device_topic(device_id, wire.Channel.CHUNK), 1)])
        fetch_topic = wire.device_topic(device_id, wire.Channel.FETCH)
        batch = wire.FetchRequest(wire.FetchOp.CHUNKS, "r-batch", "b1", tuple(range(10)))
        client.publish(fetch_topic, wire.encode_fetch(batch))
        # The single-index form, spelled out as an older agent sends it.
        single = {"op": "chunks", "req": "r-one", "bundle": "b1", "indices": [11], "v": 1}
        client.publish(fetch_topic, json.dumps(single).encode())
        await until(lambda: len(frames) == 11)
        await client.stop()
        await gateway.stop()
        return frames

    frames = asyncio.run(run())
    assert frames == {i: chunks.data[i] for i in [*range(10), 11]}


def test_throttled_refill_waits_for_half_a_window_only_while_the_bucket_is_not_full() -> None:
    """Holding a batch back must not waste a throttled link's budget (the 0.64-of-cap bug)."""
    clock = StepClock()
    transport = MqttTransport(
        "dev-batch-throttle",
        MqttSettings("127.0.0.1", 1, "dev-batch-throttle"),
        clock=clock,
        profile=LinkProfile.flat(10_000, burst=5_000),
        window=4,
    )
    sent: list[list[int]] = []
    transport._request = lambda _bundle, indices: sent.append(list(indices))  # type: ignore[method-assign]
    transport._size_estimate = 1_000.0
    queue = [9, 8, 7, 6, 5]  # popped from the end
    outstanding = {0: clock.t + 60, 1: clock.t + 60, 2: clock.t + 60}  # one slot free of four
    bucket = transport._bucket.bucket
    bucket.tokens, bucket.updated = 0.0, clock.t
    transport._request_more("b1", queue, outstanding, clock.t)
    assert sent == [], "one free slot of four, bucket not full: wait for half the window"
    assert transport._next_wake(outstanding, clock.t, True, True) == pytest.approx(0.5)
    clock.t += 0.5  # the bucket is full now: waiting longer would lose budget
    transport._request_more("b1", queue, outstanding, clock.t)
    assert sent == [[5]]
    # Two free slots (half the window): a batch of both, each charged to the bucket.
    del outstanding[0], outstanding[1]
    clock.t += 0.5
    transport._request_more("b1", queue, outstanding, clock.t)
    assert sent == [[5], [6, 7]]
    assert bucket.tokens == pytest.approx(5_000 - 2_000)
