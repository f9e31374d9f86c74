"""Broker security against a real Mosquitto with the production config (TLS, CN identity, ACL).

Denial is tested by *delivery*: a v5 PUBACK with reason 135 for a publish, and for a
subscription "nothing arrives" (Mosquitto 2.0 may grant a denied filter in its SUBACK).
"""

from __future__ import annotations

import asyncio
import ssl

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_mqtt_transport import Chunks, Inbox
from transport_pki import ThrowawayPKI

from agent.adapters.mqtt import MqttTransport
from agent.transport.aioclient import AsyncMqttClient, MqttSettings, TlsFiles
from controller.gateway import MqttGateway
from firmware_bundles import protocol as wire

pytestmark = pytest.mark.broker

NOT_AUTHORIZED = 135


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        self.messages.append((topic, payload))


async def _client(settings: MqttSettings, sink: Sink | None = None) -> AsyncMqttClient:
    client = AsyncMqttClient(settings, on_message=sink)
    await client.start()
    assert await client.wait_connected(5), client.stats.last_error
    return client


def test_device_is_confined_to_its_subtree(secure_broker) -> None:
    """Every publish and subscribe outside dev/<own id>/ is refused by delivery."""

    async def run() -> dict[str, int]:
        ctl_sink, dev_sink, victim_sink = Sink(), Sink(), Sink()
        controller = await _client(secure_broker.settings("controller"), ctl_sink)
        attacker = await _client(secure_broker.settings("dev-a"), dev_sink)
        victim = await _client(secure_broker.settings("dev-b"), victim_sink)
        await controller.subscribe([("#", 1), ("$SYS/#", 0)])
        await victim.subscribe(
            [
                (wire.device_topic("dev-b", wire.Channel.CMD), 1),
                (wire.device_topic("dev-b", wire.Channel.CHUNK), 1),
            ]
        )
        # Attacker subscribes everywhere it must not read.
        evil_filters = [
            "#",
            "+/#",
            "slotline/#",
            "slotline/v1/dev/+/cmd",
            "slotline/v1/dev/+/chunk",
            "slotline/v1/dev/dev-b/#",
            "slotline/v1/dev/dev-b/cmd",
            "slotline/v1/dev/dev-b/chunk",
            "slotline/v1/dev/dev-b/state",
            "$SYS/#",
            "$share/g/slotline/v1/dev/+/cmd",
            "slotline/v1/dev/dev-a/state",
        ]
        await attacker.subscribe([(f, 1) for f in evil_filters])
        # Attacker publishes where it must not write.
        evil_topics = [
            "slotline/v1/dev/dev-b/cmd",
            "slotline/v1/dev/dev-b/chunk",
            "slotline/v1/dev/dev-b/state",
            "slotline/v1/dev/dev-b/events",
            "slotline/v1/dev/dev-b/online",
            "slotline/v1/dev/dev-b/fetch",
            "slotline/v1/dev/dev-a/cmd",
            "slotline/v1/dev/dev-a/chunk",
            "slotline/v1/other",
            "$SYS/broker/x",
            "x",
            "slotline/v1/dev/dev-a",
        ]
        codes = await asyncio.gather(*(attacker.publish(t, b"evil") for t in evil_topics))
        # Its own channels work.
        own = await asyncio.gather(
            *(
                attacker.publish(wire.device_topic("dev-a", ch), b"{}")
                for ch in (wire.Channel.STATE, wire.Channel.EVENTS, wire.Channel.FETCH)
            )
        )
        # Traffic the attacker's wildcard subscriptions would see if they were granted.
        await controller.publish(wire.device_topic("dev-b", wire.Channel.CMD), b"secret-cmd")
        await controller.publish(wire.device_topic("dev-b", wire.Channel.CHUNK), b"secret-chunk")
        await victim.publish(wire.device_topic("dev-b", wire.Channel.STATE), b"victim-state")
        await asyncio.sleep(1.0)
        for c in (controller, attacker, victim):
            await c.stop()
        assert all(code == NOT_AUTHORIZED for code in codes), dict(
            zip(evil_topics, codes, strict=True)
        )
        assert own == [0, 0, 0]
        # Nothing the attacker published reached anyone.
        assert not [m for m in ctl_sink.messages if m[1] == b"evil"]
        assert not [m for m in victim_sink.messages if m[1] == b"evil"]
        # The attacker saw nothing of the victim's or the broker's traffic.
        assert dev_sink.messages == [], dev_sink.messages
        # The victim got its own traffic (the ACL is not just closed for everybody).
        assert {p for _, p in victim_sink.messages} == {b"secret-cmd", b"secret-chunk"}
        return {
            "publish_attempts": len(evil_topics),
            "publish_denied": codes.count(NOT_AUTHORIZED),
            "subscribe_attempts": len(evil_filters),
            "subscribe_leaks": len(dev_sink.messages),
        }

    report = asyncio.run(run())
    print("ACL report:", report)


def _raw_connect(port: int, tls: TlsFiles | None, client_id: str) -> str:
    """Connect once with a blocking paho client; return 'ok' or why it failed."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if tls is not None:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        if tls.cert is not None:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        client.tls_set_context(ctx)
    result: list[str] = []
    client.on_connect = lambda c, u, f, rc, p: result.append("ok" if not rc.is_failure else str(rc))
    try:
        client.connect("127.0.0.1", port, keepalive=5)
        for _ in range(50):
            client.loop(0.05)
            if result:
                break
    except (OSError, ssl.SSLError) as e:
        return f"refused: {type(e).__name__}"
    finally:
        client.disconnect()
    return result[0] if result else "refused: no CONNACK"


def test_anonymous_expired_and_revoked_certificates_are_refused(secure_broker) -> None:
    port, pki = secure_broker.broker.port, secure_broker.pki
    good_cert, good_key = pki.issue("dev-ok")
    assert _raw_connect(port, TlsFiles(pki.ca, good_cert, good_key), "dev-ok") == "ok"
    attempts = {
        "no client certificate": _raw_connect(port, TlsFiles(pki.ca), "anon"),
        "plain TCP, no TLS": _raw_connect(port, None, "anon"),
    }
    cert, key = pki.issue("dev-old", expired=True)
    attempts["expired certificate"] = _raw_connect(port, TlsFiles(pki.ca, cert, key), "dev-old")
    # A certificate from another CA.
    other = ThrowawayPKI(pki.dir / "other")
    cert, key = other.issue("dev-x")
    attempts["foreign CA"] = _raw_connect(port, TlsFiles(pki.ca, cert, key), "dev-x")
    print("refusal report:", attempts)
    assert all(r != "ok" for r in attempts.values()), attempts


def test_revoked_certificate_is_refused(tmp_path, secure_broker) -> None:
    pki = secure_broker.pki
    cert, key = pki.issue("dev-rev")
    pki.revoke("dev-rev")
    # Mosquitto reads the CRL at start: restart the broker on the same config.
    broker = secure_broker.broker
    broker.restart()
    other_cert, other_key = pki.issue("dev-fine")
    assert _raw_connect(broker.port, TlsFiles(pki.ca, other_cert, other_key), "dev-fine") == "ok"
    assert _raw_connect(broker.port, TlsFiles(pki.ca, cert, key), "dev-rev") != "ok"


def test_client_id_reuse_cannot_kick_another_device(secure_broker) -> None:
    """dev-evil connects with client id 'dev-victim': the broker renames it to its CN."""

    async def run() -> tuple[int, int]:
        victim = await _client(secure_broker.settings("dev-victim"))
        evil = await _client(secure_broker.settings("dev-evil", client_id="dev-victim"))
        await asyncio.sleep(1.0)
        still_connected = victim.connected and victim.stats.disconnects == 0
        # And the impostor still only has its own rights.
        code = await evil.publish(wire.device_topic("dev-victim", wire.Channel.STATE), b"x")
        await evil.stop()
        await victim.stop()
        return int(still_connected), code

    connected, code = asyncio.run(run())
    assert connected == 1
    assert code == NOT_AUTHORIZED


def test_the_real_flow_works_under_the_production_acl(secure_broker) -> None:
    """Gateway (controller identity) and a device over TLS with the ACL: every channel works."""

    async def run() -> tuple[Inbox, list[bytes], list[int]]:
        inbox = Inbox()
        gateway = MqttGateway(secure_broker.settings("controller"), inbox, Chunks(n=5))
        await gateway.start()
        assert await gateway.wait_ready(5)
        await asyncio.sleep(0.3)
        device = MqttTransport("dev-1", secure_broker.settings("dev-1"))
        await device.start()
        assert await device.client.wait_connected(5)
        assert await device.reachable(5)
        await device.publish_state({"phase": "idle"})
        await device.publish_event({"type": "hello"})
        gateway.publish_command("dev-1", b'{"signed":{},"signatures":[]}')
        cmd = await asyncio.wait_for(anext(device.commands()), 5)
        got = sorted([i async for i, _ in device.fetch_chunks("b1", [0, 1, 2, 3, 4])])
        for _ in range(100):
            if inbox.states and inbox.events:
                break
            await asyncio.sleep(0.05)
        await device.client.stop(disconnect=False)  # power cut: the will must pass the ACL
        for _ in range(100):
            if inbox.online and inbox.online[-1] == ("dev-1", False):
                break
            await asyncio.sleep(0.05)
        await gateway.stop()
        assert device.client.stats.denied == 0
        assert gateway.client.stats.denied == 0
        return inbox, [cmd], got

    inbox, cmds, got = asyncio.run(run())
    assert cmds == [b'{"signed":{},"signatures":[]}']
    assert got == [0, 1, 2, 3, 4]
    assert inbox.states == [("dev-1", {"phase": "idle", "v": 1})]
    assert inbox.events == [("dev-1", {"type": "hello", "v": 1})]
    assert ("dev-1", True) in inbox.online
    assert inbox.online[-1] == ("dev-1", False)
