"""A device's credentials cannot act as a site relay on the central broker.

The controller serves ``relay-<site>`` whatever was offered to the site (controller/releases.py),
and it knows who asks only by the topic ``slotline/v1/dev/<id>/fetch``. The broker's ACL ties that
``<id>`` to the sender's certificate CN, and enrollment never signs a ``relay-`` CN
(tests/controller/test_enrollment.py), so only the relay's own certificate can ask as the relay.
Real Mosquitto with the production config (TLS, CN identity, ACL).
"""

from __future__ import annotations

import asyncio

import pytest
from test_mqtt_transport import Inbox

from agent.adapters.mqtt import MqttTransport
from agent.transport.aioclient import AsyncMqttClient
from controller.gateway import MqttGateway
from firmware_bundles import protocol as wire

pytestmark = pytest.mark.broker

NOT_AUTHORIZED = 135
RELAY = "relay-s1"


class SiteOffers:
    """A ``ChunkSource`` offering bundle ``b1`` to site s1's relay only; records who asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        self.asked.append(device_id)
        if device_id != RELAY or bundle_id != "b1" or index >= 3:
            return None
        return bytes([index]) * 1024

    def site_of(self, device_id: str) -> str | None:
        return "s1" if device_id == RELAY else None


def test_device_certificate_cannot_fetch_as_a_relay(secure_broker) -> None:
    async def run() -> tuple[list[int], list[int], SiteOffers]:
        offers = SiteOffers()
        gateway = MqttGateway(secure_broker.settings("controller"), Inbox(), offers)
        await gateway.start()
        assert await gateway.wait_ready(5)
        # dev-a's certificate, asking under the relay's topic and client id.
        impostor = AsyncMqttClient(secure_broker.settings("dev-a", client_id=RELAY))
        await impostor.start()
        assert await impostor.wait_connected(5), impostor.stats.last_error
        fetch = wire.encode_fetch(wire.FetchRequest(wire.FetchOp.CHUNKS, "r1", "b1", (0, 1, 2)))
        denied = [
            await impostor.publish(wire.device_topic(RELAY, wire.Channel.FETCH), fetch)
            for _ in range(3)
        ]
        await asyncio.sleep(0.5)
        asked_by_impostor = list(offers.asked)
        await impostor.stop()
        # The relay's own certificate gets the site's chunks: the ACL is not just closed.
        relay = MqttTransport(RELAY, secure_broker.settings(RELAY), request_timeout=3.0)
        await relay.start()
        assert await relay.client.wait_connected(5)
        got = sorted([i async for i, _ in relay.fetch_chunks("b1", [0, 1, 2])])
        await relay.stop()
        await gateway.stop()
        assert asked_by_impostor == []
        return denied, got, offers

    denied, got, offers = asyncio.run(run())
    assert denied == [NOT_AUTHORIZED] * 3
    assert got == [0, 1, 2]
    assert set(offers.asked) == {RELAY}
