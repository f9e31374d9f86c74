"""`slotline agent run` against the real Mosquitto: retained state, signed commands, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.adapters.bootenv import DEFAULT_ENV, RedundantEnv
from firmware_bundles.commands import Action, sign_command
from firmware_bundles.keys import SigningKey
from firmware_bundles.protocol import Channel, device_topic
from firmware_bundles.trust import Role, make_root, sign_root

KEYS = [SigningKey.from_seed(bytes([i]) * 32) for i in range(31, 34)]
SLOTLINE = str(Path(sys.executable).with_name("slotline"))


def _sub(host: str, port: int, topic: str, count: int, seconds: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "mosquitto_sub",
            "-V",
            "mqttv5",
            "-h",
            host,
            "-p",
            str(port),
            "-t",
            topic,
            "-C",
            str(count),
            "-W",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.broker
def test_daemon_publishes_state_refuses_bad_commands_and_stops_cleanly(tmp_path, mosquitto_addr):
    host, port = mosquitto_addr
    dev = f"agent-test-{uuid.uuid4().hex[:8]}"
    now = int(time.time())
    root = make_root(
        version=1,
        expires=now + 10**6,
        role_keys={
            Role.ROOT: [KEYS[0].public],
            Role.RELEASE: [KEYS[1].public],
            Role.COMMAND: [KEYS[2].public],
        },
    )
    (tmp_path / "trust.json").write_bytes(sign_root(root, [KEYS[0]]))
    (tmp_path / "a.img").write_bytes(os.urandom(4096))
    RedundantEnv(str(tmp_path / "env")).write(dict(DEFAULT_ENV))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[device]
id = "{dev}"
factory_version = "1.0"
factory_size = 4096
[trust]
root = "{tmp_path / "trust.json"}"
[slots]
kind = "file"
a = "{tmp_path / "a.img"}"
b = "{tmp_path / "b.img"}"
size = 65536
booted = "env"
[bootenv]
kind = "file"
path = "{tmp_path / "env"}"
[journal]
path = "{tmp_path / "journal.json"}"
[mqtt]
url = "mqtt://{host}:{port}"
""")
    proc = subprocess.Popen(
        [SLOTLINE, "agent", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        state = _sub(host, port, device_topic(dev, Channel.STATE), 1, 15)
        out, _ = state.communicate(timeout=20)
        doc = json.loads(out.splitlines()[0])
        assert doc["phase"] == "idle"
        assert doc["version"] == "1.0"
        assert doc["device"] == dev
        events = _sub(host, port, device_topic(dev, Channel.EVENTS), 2, 15)
        time.sleep(0.5)
        # a rollback with no GOOD other slot, then a command for another device
        for counter, target in ((5, dev), (6, "someone-else")):
            cmd = sign_command(
                [KEYS[2]],
                device=target,
                counter=counter,
                action=Action.ROLLBACK,
                args={},
                issued=now,
            )
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-V",
                    "mqttv5",
                    "-h",
                    host,
                    "-p",
                    str(port),
                    "-q",
                    "1",
                    "-t",
                    device_topic(dev, Channel.CMD),
                    "-s",
                ],
                input=cmd,
                check=True,
            )
        out, _ = events.communicate(timeout=20)
        codes = [json.loads(line).get("code") for line in out.splitlines() if line.strip()]
        assert "agent.no_rollback_slot" in codes
        assert "command.wrong_device" in codes
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"agent stopped" in stdout
