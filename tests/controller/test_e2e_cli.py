"""The real service process and the real CLIs: serve, enroll, token, release, rollout, device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from firmware_bundles.bundle import build_bundle
from firmware_bundles.keyring import generate_keyset
from firmware_bundles.trust import Role


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLOTLINE = [sys.executable, "-c", "import slotline_cli; slotline_cli.main()"]


def _run(*args, env, check=True):
    r = subprocess.run(
        [*SLOTLINE, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


@pytest.fixture
def server(tmp_path, fleet_files):
    port = free_port()
    data = tmp_path / "ctl"
    proc = subprocess.Popen(
        [
            *SLOTLINE,
            "controller",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data),
            "--tick",
            "0.1",
            "--trust",
            str(fleet_files["trust"]),
            "--command-key",
            str(fleet_files["command_key"]),
            "--max-upload",
            str(2 * 1024 * 1024),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read())
            time.sleep(0.05)
        env = {
            **os.environ,
            "SLOTLINE_URL": url,
            "SLOTLINE_TOKEN": (data / "admin.token").read_text().strip(),
        }
        yield url, env
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def fleet_files(tmp_path, clock):
    keys = generate_keyset(tmp_path / "keys", now=int(time.time()) - 60)
    img = tmp_path / "v2.img"
    img.write_bytes(os.urandom(100_000))
    slb = tmp_path / "v2.slb"
    build_bundle(
        img,
        slb,
        release_keys=keys.signers(Role.RELEASE),
        version="2.0",
        hardware=["m1"],
        now=int(time.time()) - 30,
    )
    big = tmp_path / "big.slb"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    return {
        "trust": tmp_path / "keys" / "trust.json",
        "command_key": next((tmp_path / "keys").glob("command-*.key")),
        "slb": slb,
        "big": big,
    }


def test_operator_enrolls_uploads_and_rolls_out_through_the_cli(server, fleet_files, tmp_path):
    url, env = server
    for i in range(3):
        tok = _run("token", "enroll", "--site", "berlin", "--model", "m1", env=env).stdout.strip()
        out = _run(
            "enroll",
            "--controller",
            url,
            "--token",
            tok,
            "--device-id",
            f"gw-{i}",
            "--hardware-model",
            "m1",
            "--serial",
            f"SN{i}",
            "--dir",
            str(tmp_path / f"id{i}"),
            "--json",
            env=env,
        )
        assert json.loads(out.stdout)["device_id"] == f"gw-{i}"
        assert (tmp_path / f"id{i}" / "device.key").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / f"id{i}" / "trust.json").exists()
    again = _run(
        "enroll",
        "--controller",
        url,
        "--token",
        tok,
        "--device-id",
        "gw-x",
        "--hardware-model",
        "m1",
        "--dir",
        str(tmp_path / "idx"),
        env=env,
        check=False,
    )
    assert again.returncode == 1
    assert "already used" in again.stderr
    devices = json.loads(_run("device", "list", "--json", env=env).stdout)
    assert [d["id"] for d in devices] == ["gw-0", "gw-1", "gw-2"]

    rel = json.loads(_run("release", "upload", str(fleet_files["slb"]), "--json", env=env).stdout)
    too_big = _run("release", "upload", str(fleet_files["big"]), "--json", env=env, check=False)
    assert too_big.returncode == 1
    assert json.loads(too_big.stdout)["code"] == "controller.too_large"
    ro = json.loads(
        _run(
            "rollout",
            "create",
            "--name",
            "tue",
            "--release",
            rel["bundle_id"],
            "--trial-device",
            "gw-0",
            "--phases",
            "50,100",
            "--json",
            env=env,
        ).stdout
    )
    assert [g["total"] for g in ro["groups"]] == [1, 1, 1]
    _run("rollout", "start", str(ro["id"]), env=env)
    for _ in range(100):
        st = json.loads(_run("rollout", "status", str(ro["id"]), "--json", env=env).stdout)
        if st["groups"][0]["counts"].get("commanded"):
            break
        time.sleep(0.1)
    assert st["groups"][0]["counts"] == {"commanded": 1}
    assert st["groups"][1]["state"] == "scheduled"  # the trial gate has not passed
    _run("rollout", "pause", str(ro["id"]), env=env)
    out = _run("rollout", "status", str(ro["id"]), env=env).stdout
    assert "paused by bootstrap-admin" in out
    watched = _run("rollout", "status", str(ro["id"]), "--watch", "--interval", "0.2", env=env)
    assert "paused" in watched.stdout  # --watch ends when the rollout stops moving
    assert "gw-1" in _run("device", "show", "gw-1", env=env).stdout
    assert rel["bundle_id"] in _run("release", "list", env=env).stdout
    shown = json.loads(_run("release", "show", rel["bundle_id"], "--json", env=env).stdout)
    assert shown["payloads"][0]["kind"] == "full"
    viewer = _run("token", "api", "--name", "v", "--role", "viewer", env=env).stdout.strip()
    denied = _run(
        "rollout",
        "abort",
        str(ro["id"]),
        "--json",
        env={**env, "SLOTLINE_TOKEN": viewer},
        check=False,
    )
    assert json.loads(denied.stdout)["code"] == "auth.forbidden"
    _run("rollout", "rollback", str(ro["id"]), env=env)
    audit = httpx.get(
        url + "/api/v1/audit", headers={"Authorization": f"Bearer {env['SLOTLINE_TOKEN']}"}
    ).json()
    assert {"rollout.rollback", "rollout.pause", "release.upload", "token.issue"} <= {
        a["action"] for a in audit
    }
