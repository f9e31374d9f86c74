"""The brokers Slotline starts itself: generated configs, and iotcore as the fallback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.transport.aioclient import AsyncMqttClient, MqttSettings
from agent.transport.broker import EmbeddedBroker, render_packaging

pytestmark = pytest.mark.broker

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"


def test_packaged_configs_match_the_generator() -> None:
    for name, text in render_packaging().items():
        assert (PACKAGING / name).read_text() == text, (
            f"run: slotline broker render --out {PACKAGING}"
        )


async def _retained_and_shared(broker: EmbeddedBroker) -> tuple[list[bytes], list[int]]:
    def settings(cid: str) -> MqttSettings:
        return MqttSettings(broker.host, broker.port, cid, backoff_initial=0.05)

    pub = AsyncMqttClient(settings("pub"))
    await pub.start()
    assert await pub.wait_connected(5)
    await pub.publish("slotline/v1/dev/d1/state", b"retained-1", retain=True)
    late: list[bytes] = []
    reader = AsyncMqttClient(settings("late"), on_message=lambda t, p, r: late.append(p))
    await reader.start()
    assert await reader.wait_connected(5)
    await reader.subscribe([("slotline/v1/dev/+/state", 1)])
    counts = [0, 0, 0]
    members = []
    for i in range(3):

        def sink(t: str, p: bytes, r: bool, i: int = i) -> None:
            counts[i] += 1

        member = AsyncMqttClient(settings(f"member-{i}"), on_message=sink)
        await member.start()
        assert await member.wait_connected(5)
        await member.subscribe([("$share/g/slotline/v1/dev/+/events", 1)])
        members.append(member)
    await asyncio.sleep(0.3)
    await asyncio.gather(*(pub.publish("slotline/v1/dev/d1/events", b"e") for _ in range(90)))
    await asyncio.sleep(0.5)
    for c in [pub, reader, *members]:
        await c.stop()
    return late, counts


@pytest.mark.parametrize("kind", ["mosquitto", "iotcore"])
def test_embedded_backend_keeps_retained_and_splits_shared_subscriptions(tmp_path, kind) -> None:
    if kind not in EmbeddedBroker.available():
        pytest.skip(f"{kind} not available")
    broker = EmbeddedBroker.start_default(tmp_path, kind=kind)
    try:
        late, counts = asyncio.run(_retained_and_shared(broker))
    finally:
        broker.stop()
    assert late == [b"retained-1"]
    assert sum(counts) == 90
    assert all(c > 0 for c in counts), counts
