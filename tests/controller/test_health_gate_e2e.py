"""Health gate end to end: real agents report health, the real controller gates on it.

The controller is the real ``ControllerService`` (SQLite in the test's directory) with the real
MQTT gateway on the machine's Mosquitto; every device is the real ``agent.runtime.Agent`` with
file slots, the U-Boot env in a file, the simulated bootloader deciding what boots, its MQTT
transport, the signed-command verifier and a health sampler. A device on version 2.0 of the
"degraded" run adds errors through a metric source: the hook the simulator's "degraded health"
fault knob uses. Nothing is faked: commands are signed by the controller and verified by the
agents, chunks travel over MQTT, devices reboot into the new slot and commit.

Device ids, the gateway's client id and its share group carry a per-test tag, so runs sharing
the broker never see each other's devices; the gateway ignores other devices' traffic, so its drop
counters are this run's alone: a healthy run with our own agents drops nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from pathlib import Path

import pytest

from agent.adapters.bootenv import DEFAULT_ENV, RedundantEnv, SimBootloader
from agent.adapters.mqtt import MqttTransport
from agent.adapters.slots import FileSlots
from agent.adapters.state_file import FileJournal
from agent.health import HealthSampler, StaticMetrics
from agent.runtime import Agent, AgentConfig
from agent.selftest import Check, SelfTestRunner
from agent.transport.aioclient import MqttSettings
from agent.verify import make_verifier
from controller.gateway import MqttGateway
from controller.rollout import planner as p
from controller.rollout.scheduler import PhaseSpec
from controller.service import ControllerConfig, ControllerService
from firmware_bundles import protocol as wire

pytestmark = [pytest.mark.broker]

SIZE = 64 * 1024
MODEL = "m1"


class _Clock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class _Power:
    async def reboot(self) -> None:
        """The life loop boots the device again when ``run()`` returns ``"reboot"``."""


class Box:
    """One device: its files, and its life (boot, run the agent, reboot, ...)."""

    def __init__(
        self,
        root: Path,
        device_id: str,
        factory: Path,
        versions: dict[str, str],
        degraded: dict[str, int],
    ) -> None:
        self.dir = root / device_id
        self.dir.mkdir(parents=True)
        self.id = device_id
        self.versions = versions  # image sha256 -> version
        self.degraded = degraded  # version -> extra errors its devices report
        (self.dir / "slot_a").write_bytes(factory.read_bytes())
        with (self.dir / "slot_b").open("wb") as fh:
            fh.truncate(SIZE)
        RedundantEnv(str(self.dir / "bootenv")).write(dict(DEFAULT_ENV))
        (self.dir / "app-ok").touch()
        self.agent: Agent | None = None
        self.boots = 0
        self._stopping = False

    def _version(self, slot) -> str | None:
        data = (self.dir / f"slot_{slot.value}").read_bytes()[:SIZE]
        return self.versions.get(hashlib.sha256(data).hexdigest())

    async def life(self, broker: str, trust: bytes) -> None:
        for _ in range(10):  # bounded: two boots per update, a revert at most two more
            if self._stopping:
                return
            booted = SimBootloader(RedundantEnv(str(self.dir / "bootenv"))).boot()
            self.boots += 1
            version = self._version(booted)
            extra = self.degraded.get(version or "", 0)
            # The simulator's knob in one line: a metric source for the booted version.
            sources = [StaticMetrics({"errors": extra})] if extra else []
            clock = _Clock()
            settings = MqttSettings.from_url(
                broker,
                self.id,
                keepalive=30,
                backoff_initial=0.2,
                backoff_max=1.0,
                session_expiry=60,
            )
            transport = MqttTransport(self.id, settings, clock=clock, request_timeout=5.0)
            slots = FileSlots(
                str(self.dir / "slot_a"), str(self.dir / "slot_b"), booted=booted, capacity=SIZE
            )
            agent = Agent(
                AgentConfig(
                    device_id=self.id,
                    hardware=MODEL,
                    factory_version="1.0",
                    factory_size=SIZE,
                    retry_base=0.2,
                    retry_cap=1.0,
                ),
                slots=slots,
                bootenv=RedundantEnv(str(self.dir / "bootenv")),
                journal=FileJournal(str(self.dir / "journal.json")),
                clock=clock,
                power=_Power(),
                booted=booted,
                transport=transport,
                verifier=make_verifier(trust, device_id=self.id, hardware=MODEL),
                selftest=SelfTestRunner(
                    [Check("file", name="app", path=str(self.dir / "app-ok"))],
                    deadline=10,
                    transport=transport,
                ),
                health=HealthSampler(sources, interval=1),
            )
            self.agent = agent
            await transport.start()
            await transport.client.wait_connected(10.0)
            try:
                outcome = await agent.run()
            finally:
                with contextlib.suppress(Exception):
                    slots.close()
            if outcome == "stopped":
                return
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self._stopping = True
        if self.agent is not None:
            self.agent.stop()


class _ScopedGateway(MqttGateway):
    """The real gateway, deaf to devices of other runs on the shared broker (their junk is theirs)."""

    def __init__(self, *args: object, prefix: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.prefix = prefix

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith(f"{wire.TOPIC_PREFIX}/{self.prefix}"):
            super()._on_message(topic, payload, retained)


async def _until(what, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        await asyncio.sleep(step)
    return what()


async def _scenario(tmp_path: Path, broker: str, fleet_cls, *, degraded: dict[str, int]):
    """Four devices on 1.0; a rollout of 2.0 in two phases of two, the first health-gated.

    Returns the rollout status, the controller's device documents and the agents' own states;
    fails if the gateway dropped any of the agents' messages.
    """
    tag = uuid.uuid4().hex[:8]
    svc = ControllerService(
        ControllerConfig(
            database_url=f"sqlite:///{tmp_path / 'controller.db'}",
            data_dir=tmp_path / "data",
            broker_url=broker,
        ),
        clock=time.time,
    )
    fleet = fleet_cls(svc, tmp_path, time.time)
    v1 = fleet.image("v1", size=SIZE, seed=1)
    v2 = fleet.mutate(v1, "v2")
    release = fleet.upload(fleet.bundle(v2, "2.0", models=(MODEL,)))
    versions = {
        hashlib.sha256(v1.read_bytes()).hexdigest(): "1.0",
        hashlib.sha256(v2.read_bytes()).hexdigest(): "2.0",
    }
    ids = fleet.enroll(4, model=MODEL, prefix=f"hg{tag}-")
    trust = (tmp_path / "keys" / "trust.json").read_bytes()

    settings = MqttSettings.from_url(broker, f"hg-controller-{tag}", session_expiry=60)
    gateway = _ScopedGateway(
        settings, inbox=svc, chunks=svc, share_group=f"hg{tag}", prefix=f"hg{tag}-"
    )
    svc.gateway = gateway
    boxes = [Box(tmp_path / "devices", d, v1, versions, degraded) for d in ids]
    lives: list[asyncio.Task] = []
    stop_ticking = asyncio.Event()

    async def ticking() -> None:
        while not stop_ticking.is_set():
            svc.tick()
            await asyncio.sleep(0.1)

    await gateway.start()
    ticker = asyncio.create_task(ticking())
    try:
        assert await gateway.wait_ready(10), "the gateway did not connect to Mosquitto"
        lives = [asyncio.create_task(b.life(broker, trust)) for b in boxes]

        def reported() -> bool:
            docs = [svc.get_device(fleet.ops, d) for d in ids]
            return all("errors" in (doc["health"] or {}) and doc["active_digest"] for doc in docs)

        assert await _until(reported, 20), "devices did not report health before the rollout"
        gate = p.Gate(min_successes=2, health_tolerance_pct=20)
        ro = svc.scheduler.create(
            fleet.ops,
            name=f"health-{tag}",
            release_id=release["bundle_id"],
            phases=[PhaseSpec("first", 50, gate), PhaseSpec("rest", 100, p.Gate())],
        )
        svc.scheduler.start(fleet.ops, ro["id"])

        def settled():
            st = svc.scheduler.status(ro["id"])
            return st if st["state"] in ("paused", "stopped", "finished") else None

        status = await _until(settled, 60)
        assert status is not None, svc.scheduler.status(ro["id"])
        await asyncio.sleep(0.5)  # anything commanded after the decision would show up now
        docs = {d: svc.get_device(fleet.ops, d) for d in ids}
        agents = {b.id: b.agent.status() if b.agent else None for b in boxes}
        status = svc.scheduler.status(ro["id"])
    finally:
        for b in boxes:
            b.stop()
        if lives:
            await asyncio.wait(lives, timeout=10)
        for t in lives:
            t.cancel()
        stop_ticking.set()
        await ticker
        # leave no retained messages of this test's devices on the shared broker
        cleared = [
            gateway.client.publish(wire.device_topic(d, ch), b"", retain=True)
            for d in ids
            for ch in (wire.Channel.STATE, wire.Channel.ONLINE)
        ]
        await asyncio.wait_for(asyncio.gather(*cleared, return_exceptions=True), 10)
        await gateway.stop()
        svc.close()
    for t in lives:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()
    # Our own agents speak the protocol: every drop is a sender/receiver mismatch (a committed
    # result's "code": null was dropped as protocol.malformed, so results never reached us).
    assert dict(gateway.stats.drops.counts) == {}, gateway.stats.drops.counts
    assert dict(gateway.serving_stats.drops.counts) == {}, gateway.serving_stats.drops.counts
    assert gateway.stats.inbox_errors == 0
    return status, docs, agents


def test_worse_health_on_the_new_version_pauses_the_rollout(
    tmp_path, mosquitto_addr, fleet_cls
) -> None:
    host, port = mosquitto_addr
    status, docs, agents = asyncio.run(
        _scenario(tmp_path, f"mqtt://{host}:{port}", fleet_cls, degraded={"2.0": 5})
    )
    assert status["state"] == "paused", status
    assert "health of updated devices 5 is worse than 0" in status["reason"]
    first, rest = status["groups"]
    assert first["state"] == "error"
    assert "health of updated devices" in first["reason"]
    assert first["counts"] == {"succeeded": 2}
    assert rest["state"] == "scheduled"
    assert rest["counts"] == {"scheduled": 2}
    updated = [d for d, doc in docs.items() if doc["versions"] == {"rootfs": "2.0"}]
    assert len(updated) == 2
    for d, doc in docs.items():
        # what the agents reported is what the controller holds
        assert doc["health"] == {"errors": 5 if d in updated else 0}
        assert agents[d]["health"] == doc["health"]
        assert agents[d]["phase"] == ("committed" if d in updated else "idle")


def test_equal_health_lets_the_rollout_proceed(tmp_path, mosquitto_addr, fleet_cls) -> None:
    host, port = mosquitto_addr
    status, docs, agents = asyncio.run(
        _scenario(tmp_path, f"mqtt://{host}:{port}", fleet_cls, degraded={})
    )
    assert status["state"] == "finished", status
    assert [g["state"] for g in status["groups"]] == ["finished", "finished"]
    for d, doc in docs.items():
        assert doc["versions"] == {"rootfs": "2.0"}
        assert doc["health"] == {"errors": 0}
        assert agents[d]["last_result"]["outcome"] == "committed"
