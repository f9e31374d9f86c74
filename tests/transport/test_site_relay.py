"""Site relay: many devices at a site, each chunk crosses the WAN once."""

from __future__ import annotations

import asyncio

import pytest
from test_mqtt_transport import Chunks, _gateway, _settings

from agent.adapters.mqtt import MqttTransport
from agent.transport.broker import BridgeConfig, EmbeddedBroker, MosquittoConfig, free_port
from agent.transport.relay import ChunkCache, SiteRelay

pytestmark = pytest.mark.broker


@pytest.fixture
def site_broker(tmp_path, plain_broker):
    broker = EmbeddedBroker.start_mosquitto(
        MosquittoConfig(port=free_port(), run_as_root=True), tmp_path / "site"
    )
    yield broker
    broker.stop()


def test_relay_fetches_each_chunk_once_and_serves_many_devices(
    tmp_path, plain_broker, site_broker
) -> None:
    chunks = Chunks(n=30)
    asked: list[tuple[str, int]] = []
    resolve = chunks.resolve_chunk

    def recording(device_id: str, bundle_id: str, index: int) -> bytes | None:
        asked.append((device_id, index))
        return resolve(device_id, bundle_id, index)

    chunks.resolve_chunk = recording  # type: ignore[method-assign]

    async def run() -> tuple[list[dict[int, bytes]], SiteRelay]:
        gateway, _ = await _gateway(plain_broker, chunks)
        relay = SiteRelay(
            "site1",
            local=_settings(site_broker, "relay-site1"),
            upstream=_settings(plain_broker, "relay-site1"),
            cache_dir=tmp_path / "cache",
        )
        await relay.start()
        assert await relay.local.wait_connected(5)
        devices = [MqttTransport(f"dev-{i}", _settings(site_broker, f"dev-{i}")) for i in range(10)]
        for d in devices:
            await d.start()
        assert all([await d.reachable(5) for d in devices])

        async def fetch(d: MqttTransport) -> dict[int, bytes]:
            return {i: b async for i, b in d.fetch_chunks("b1", list(range(30)))}

        results = await asyncio.gather(*(fetch(d) for d in devices))
        for d in devices:
            await d.stop()
        await relay.stop()
        await gateway.stop()
        return results, relay

    results, relay = asyncio.run(run())
    assert all(r == dict(enumerate(chunks.data)) for r in results)
    # Upstream saw only the relay's identity, and each chunk once.
    assert sorted(asked) == [("relay-site1", i) for i in range(30)]
    assert relay.stats.wan_chunks == 30
    assert relay.upstream.stats.duplicate_bytes == 0
    print("relay stats:", relay.stats)


def test_cache_treats_a_corrupted_file_as_missing(tmp_path) -> None:
    cache = ChunkCache(tmp_path)
    digest = cache.put("b1", 0, b"hello")
    assert cache.get("b1", 0) == b"hello"
    cache.store.path(digest).write_bytes(b"HELLO")
    assert cache.get("b1", 0) is None
    assert cache.get("b1", 1) is None


def test_site_bridge_carries_control_traffic_but_not_chunks(tmp_path, plain_broker) -> None:
    """A site broker with the generated bridge section: cmd in; state/events/online out."""
    site = EmbeddedBroker.start_mosquitto(
        MosquittoConfig(
            port=free_port(),
            run_as_root=True,
            bridge_to=BridgeConfig("central", f"127.0.0.1:{plain_broker.port}"),
        ),
        tmp_path / "bridged",
    )

    async def run():
        gateway, inbox = await _gateway(plain_broker)
        device = MqttTransport("dev-s", _settings(site, "dev-s"))
        await device.start()
        assert await device.client.wait_connected(5)
        await asyncio.sleep(1.0)  # the bridge connects and subscribes
        await device.publish_state({"phase": "idle"})
        gateway.publish_command("dev-s", b'{"signed":{},"signatures":[]}')
        cmd = await asyncio.wait_for(anext(device.commands()), 10)
        for _ in range(100):
            if inbox.states:
                break
            await asyncio.sleep(0.05)
        # fetch is not bridged: nobody answers the device's ping at the site.
        reachable = await device.reachable(1.0)
        await device.stop()
        await gateway.stop()
        return cmd, inbox.states, reachable

    try:
        cmd, states, reachable = asyncio.run(run())
    finally:
        site.stop()
    assert cmd == b'{"signed":{},"signatures":[]}'
    assert states == [("dev-s", {"phase": "idle", "v": 1})]
    assert reachable is False
