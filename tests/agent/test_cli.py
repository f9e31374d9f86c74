"""slotline agent install/status end to end: a real signed .slb, file slots, a file boot env."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.adapters.bootenv import DEFAULT_ENV, RedundantEnv, SimBootloader
from agent.cli import _build, agent
from agent.config import load_config
from firmware_bundles.bundle import build_bundle
from firmware_bundles.keys import SigningKey
from firmware_bundles.trust import Role, make_root, sign_root

KEYS = [SigningKey.from_seed(bytes([i]) * 32) for i in range(11, 14)]
SLOT = 1 << 20


@pytest.fixture
def device(tmp_path):
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
    old = os.urandom(300_000)
    new = old[:100_000] + os.urandom(50_000) + old[150_000:] + b"tail"
    (tmp_path / "a.img").write_bytes(old + b"\0" * (SLOT - len(old)))
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    env = RedundantEnv(str(tmp_path / "uboot.env"))
    env.write(dict(DEFAULT_ENV))
    (tmp_path / "ok").write_text("")
    (tmp_path / "agent.toml").write_text(f"""
[device]
id = "dev-9"
hardware = "board-x"
factory_version = "1.0"
factory_size = {len(old)}
[trust]
root = "{tmp_path / "trust.json"}"
[slots]
kind = "file"
a = "{tmp_path / "a.img"}"
b = "{tmp_path / "b.img"}"
size = {SLOT}
booted = "env"
[bootenv]
kind = "file"
path = "{tmp_path / "uboot.env"}"
[journal]
path = "{tmp_path / "state" / "journal.json"}"
[update]
checkpoint_mib = 1
[[selftest.check]]
kind = "file"
path = "{tmp_path / "ok"}"
""")
    return tmp_path, now, old, new


def _slb(tmp_path, now, name, base=None, hardware="board-x", secver=1):
    out = tmp_path / name
    build_bundle(
        tmp_path / "new.img",
        out,
        release_keys=[KEYS[1]],
        version="2.0",
        hardware=[hardware],
        now=now,
        base=base,
        security_version=secver,
        chunk_out_size=64 * 1024,
    )
    return out


def test_offline_delta_install_then_trial_commits(device) -> None:
    tmp_path, now, _old, new = device
    slb = _slb(tmp_path, now, "u.slb", base=tmp_path / "old.img")
    cfg = str(tmp_path / "agent.toml")
    r = CliRunner().invoke(agent, ["install", str(slb), "--config", cfg])
    assert r.exit_code == 0, r.output
    assert "staged in slot b" in r.output
    st = json.loads(CliRunner().invoke(agent, ["status", "--json", "--config", cfg]).output)
    assert st["phase"] == "staged"
    assert st["bootenv"]["upgrade_available"] is True
    assert st["slots"]["b"]["version"] == "2.0"
    assert st["slots"]["b"]["state"] == "unknown"
    # reboot through the (simulated) bootloader: the trial runs at the agent's start
    booted = SimBootloader(RedundantEnv(str(tmp_path / "uboot.env"))).boot()
    assert booted.value == "b"

    async def trial():
        a = _build(load_config(tmp_path / "agent.toml"))
        await a.start()
        return a

    a = asyncio.run(trial())
    assert a.state.phase.value == "committed"
    assert a.state.version == "2.0"
    st = json.loads(CliRunner().invoke(agent, ["status", "--json", "--config", cfg]).output)
    assert st["primary"] == "b"
    assert st["security_version"] == 1
    assert st["bootenv"] == {
        "boot_part": "b",
        "bootcount": 0,
        "security_version": 1,
        "upgrade_available": False,
    }
    assert (tmp_path / "b.img").read_bytes()[: len(new)] == new
    human = CliRunner().invoke(agent, ["status", "--config", cfg])
    assert human.exit_code == 0
    assert "committed" in human.output


def test_offline_install_of_a_bundle_for_other_hardware_is_refused(device) -> None:
    tmp_path, now, old, _ = device
    slb = _slb(tmp_path, now, "x.slb", hardware="board-y")
    cfg = str(tmp_path / "agent.toml")
    r = CliRunner().invoke(agent, ["install", str(slb), "--config", cfg])
    assert r.exit_code == 1
    assert "bundle.hardware_mismatch" in r.output
    st = json.loads(CliRunner().invoke(agent, ["status", "--json", "--config", cfg]).output)
    assert st["last_result"]["code"] == "bundle.hardware_mismatch"
    assert st["bootenv"]["boot_part"] == "a"
    assert not st["bootenv"]["upgrade_available"]
    assert (tmp_path / "a.img").read_bytes()[: len(old)] == old


def test_tampered_bundle_is_refused(device) -> None:
    tmp_path, now, _old, _ = device
    slb = _slb(tmp_path, now, "t.slb")
    data = bytearray(slb.read_bytes())
    data[-100] ^= 1  # a chunk byte
    slb.write_bytes(bytes(data))
    cfg = str(tmp_path / "agent.toml")
    r = CliRunner().invoke(agent, ["install", str(slb), "--config", cfg])
    assert r.exit_code == 1, r.output
    st = json.loads(CliRunner().invoke(agent, ["status", "--json", "--config", cfg]).output)
    assert st["last_result"]["outcome"] == "failed"
    assert st["last_result"]["code"].startswith("bundle.")
    assert st["bootenv"]["boot_part"] == "a"
    assert not st["bootenv"]["upgrade_available"]


def test_bad_config_is_reported(tmp_path) -> None:
    (tmp_path / "a.toml").write_text("[device]\nid='x'\n[surprise]\n")
    r = CliRunner().invoke(agent, ["status", "--config", str(tmp_path / "a.toml")])
    assert r.exit_code == 1
    assert "config.invalid" in r.output


def test_sample_config_parses() -> None:
    cfg = load_config(Path(__file__).parents[2] / "packaging" / "agent" / "agent.toml")
    assert cfg.device_id
    assert len(cfg.checks) == 6
    assert cfg.bootenv_kind == "uboot"


def test_decode_ahead_from_the_config_file_reaches_the_agent_and_installs(device) -> None:
    tmp_path, now, _old, new = device
    toml = tmp_path / "agent.toml"
    toml.write_text(toml.read_text().replace("checkpoint_mib = 1\n",
                                             "checkpoint_mib = 1\ndecode_ahead_mib = 4\n"))
    assert _build(load_config(toml)).config.decode_ahead == 4 << 20
    slb = _slb(tmp_path, now, "u.slb", base=tmp_path / "old.img")
    r = CliRunner().invoke(agent, ["install", str(slb), "--config", str(toml)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.img").read_bytes()[: len(new)] == new


def test_decode_ahead_out_of_range_is_a_config_error(device) -> None:
    tmp_path, _now, _old, _new = device
    toml = tmp_path / "agent.toml"
    toml.write_text(toml.read_text().replace("checkpoint_mib = 1\n",
                                             "checkpoint_mib = 1\ndecode_ahead_mib = -1\n"))
    r = CliRunner().invoke(agent, ["status", "--config", str(toml)])
    assert r.exit_code == 1
    assert "decode_ahead_mib" in r.output
