"""kill -9 the controller at scheduler steps of a running rollout on PostgreSQL; restart it.

The controller runs as the real ``slotline controller serve`` process with a real Mosquitto;
this test plays the devices over MQTT (answering each new install command with a result event
and a retained state, as the agent does). Kill points alternate between "while one of the
controller's PostgreSQL transactions is open" (found through pg_stat_activity) and random
instants. After every kill the invariants are checked on the database and on what devices
received; at the end the rollout must have finished with every device updated exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, select, text

from agent.transport.broker import EmbeddedBroker, MosquittoConfig
from controller.db import models as m
from controller.rollout import planner as p
from controller.rollout.scheduler import PhaseSpec
from controller.service import ControllerConfig, ControllerService
from firmware_bundles.bundle import hash_file

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
SLOTLINE = [sys.executable, "-c", "import slotline_cli; slotline_cli.main()"]
APP = "slt-restart-" + uuid.uuid4().hex[:8]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Devices:
    """The fleet's side of the wire: one MQTT client answering commands for every device."""

    def __init__(self, port, ids, target, delay=0.08):
        self.ids, self.target, self.delay = set(ids), target, delay
        self.received: dict[str, list[tuple[int, str]]] = {d: [] for d in ids}
        self.last_counter = dict.fromkeys(ids, 0)
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"devs-{APP}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("slotline/v1/dev/+/cmd", qos=1)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg):
        device = msg.topic.split("/")[3]
        if device not in self.ids:
            return
        signed = json.loads(msg.payload)["signed"]
        with self.lock:
            self.received[device].append((signed["counter"], signed["action"]))
            if signed["counter"] <= self.last_counter[device]:
                return  # a replayed command: the agent drops it, and so do we
            self.last_counter[device] = signed["counter"]
        if signed["action"] == "install":
            bundle = signed["args"]["bundle_id"]
            threading.Timer(self.delay, self._done, args=(device, bundle)).start()

    def _done(self, device, bundle):
        base = f"slotline/v1/dev/{device}"
        state = {"active_digest": self.target, "phase": "idle", "v": 1}
        self.client.publish(f"{base}/state", json.dumps(state), qos=1, retain=True)
        event = {"type": "result", "outcome": "committed", "bundle_id": bundle, "v": 1}
        self.client.publish(f"{base}/events", json.dumps(event), qos=1)

    def installs(self):
        with self.lock:
            return {d: {c for c, a in r if a == "install"} for d, r in self.received.items()}

    def close(self):
        for d in self.ids:  # clear retained states
            self.client.publish(f"slotline/v1/dev/{d}/state", b"", qos=1, retain=True)
        self.client.loop_stop()
        self.client.disconnect()


def _check_invariants(engine, devices, rollout_id):
    with engine.connect() as c:
        installs = c.execute(
            select(m.Command.device_id, m.Command.counter).where(m.Command.action == "install")
        ).all()
        per_device: dict[str, int] = {}
        for device_id, _ in installs:
            per_device[device_id] = per_device.get(device_id, 0) + 1
        assert all(n == 1 for n in per_device.values()), "a device got two install commands"
        decisions = c.execute(
            select(m.Decision.action, m.Decision.detail)
            .where(m.Decision.rollout_id == rollout_id)
            .order_by(m.Decision.id)
        ).all()
    finished: list[str] = []
    order = ["trial", "half", "all"]
    for action, detail in decisions:
        if action == "StartGroup":
            i = order.index(detail["group"])
            assert finished == order[:i], f"group {detail['group']} started before its gate"
        if action == "FinishGroup":
            finished.append(detail["group"])
    for device, counters in devices.installs().items():
        assert len(counters) <= 1, f"{device} received installs {counters}"


def _start(url_db, data, port, broker_port):
    return subprocess.Popen(
        [
            *SLOTLINE,
            "controller",
            "serve",
            "--database",
            url_db,
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--tick",
            "0.05",
            "--broker",
            f"mqtt://127.0.0.1:{broker_port}",
            "--client-id",
            f"ctl-{APP}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_ready(proc, port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"controller exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail("controller did not get ready")


def _kill_in_transaction(engine, proc, budget=1.5):
    """kill -9 as soon as one of the controller's transactions is open (else at the budget)."""
    deadline = time.monotonic() + budget
    q = text(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a "
        "AND state IN ('idle in transaction', 'active')"
    )
    with engine.connect() as c:
        while time.monotonic() < deadline:
            if c.execute(q, {"a": APP}).scalar():
                break
            c.rollback()
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_controller_continues_rollout_without_commanding_any_device_twice(
    pg_db_url, tmp_path, clock, fleet_cls
):
    if not EmbeddedBroker.available() or EmbeddedBroker.available()[0] != "mosquitto":
        if os.environ.get("SLOTLINE_REQUIRE_SERVICES") == "1":
            pytest.fail("mosquitto is not installed")
        pytest.skip("mosquitto is not installed")
    clock.now = time.time()
    data = tmp_path / "ctl"
    url_db = f"{pg_db_url}&application_name={APP}"
    svc = ControllerService(ControllerConfig(database_url=pg_db_url, data_dir=data), clock=clock)
    fleet = fleet_cls(svc, tmp_path, clock)
    v1 = fleet.image("v1", size=32 * 1024, seed=1)
    v2 = fleet.mutate(v1, "v2")
    fleet.upload(fleet.bundle(v1, "1.0"))
    rel = fleet.upload(fleet.bundle(v2, "2.0"))
    ids = fleet.enroll(16, digest=hash_file(v1).sha256, prefix=f"rs{uuid.uuid4().hex[:6]}-")
    gate = p.Gate(min_successes=1)
    ro = svc.scheduler.create(
        fleet.ops,
        name="r",
        release_id=rel["bundle_id"],
        trial_devices=ids[:2],
        trial_gate=gate,
        phases=[PhaseSpec("half", 50, gate), PhaseSpec("all", 100, gate)],
        max_in_flight=2,
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.close()

    broker = EmbeddedBroker.start_mosquitto(
        MosquittoConfig(port=_free_port(), run_as_root=True), tmp_path / "broker"
    )
    devices = Devices(broker.port, ids, hash_file(v2).sha256)
    check = create_engine(pg_db_url)
    rng = random.Random(7)
    kills = 0
    try:
        for i in range(8):
            port = _free_port()
            proc = _start(url_db, data, port, broker.port)
            _wait_ready(proc, port)
            if i % 2:
                time.sleep(rng.uniform(0.0, 0.8))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            else:
                _kill_in_transaction(check, proc)
            kills += 1
            _check_invariants(check, devices, ro["id"])
            with check.connect() as c:
                state = c.execute(select(m.Rollout.state).where(m.Rollout.id == ro["id"])).scalar()
                done = c.execute(
                    select(m.RolloutDevice.state).where(m.RolloutDevice.state == "succeeded")
                ).all()
            print(f"kill {kills}: rollout {state}, {len(done)} devices updated")
            if state == "finished":
                break
        port = _free_port()
        proc = _start(url_db, data, port, broker.port)
        _wait_ready(proc, port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with check.connect() as c:
                state = c.execute(select(m.Rollout.state).where(m.Rollout.id == ro["id"])).scalar()
            if state == "finished":
                break
            time.sleep(0.2)
        proc.terminate()
        proc.wait(timeout=20)
        assert state == "finished"
        assert kills >= 3
        _check_invariants(check, devices, ro["id"])
        assert all(len(c) == 1 for c in devices.installs().values())
        with check.connect() as c:
            states = c.execute(select(m.RolloutDevice.state)).scalars().all()
        assert sorted(set(states)) == ["succeeded"]
    finally:
        devices.close()
        broker.stop()
        check.dispose()
