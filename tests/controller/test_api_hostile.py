"""Hostile input gets a 4xx with a clear message and changes nothing."""

from __future__ import annotations

import os

import pytest
from starlette.testclient import TestClient

from controller.api.app import create_app
from controller.auth import Role
from controller.service import SYSTEM
from firmware_bundles.bundle import build_bundle
from firmware_bundles.keys import SigningKey


@pytest.fixture
def client(svc):
    with TestClient(create_app(svc)) as c:
        yield c


@pytest.fixture
def h(svc):
    return {"Authorization": f"Bearer {svc.issue_api_token(SYSTEM, 'a', Role.ADMIN, ())}"}


def _snapshot(svc):
    return (
        svc.list_devices(SYSTEM),
        svc.releases.list_releases(),
        svc.scheduler.list_rollouts(),
        [t["name"] for t in svc.list_api_tokens()],
        svc.list_sites(),
    )


def test_oversized_json_body_is_refused_before_reading(svc, client, h):
    before = _snapshot(svc)
    body = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'", "role": "admin"}'
    r = client.post(
        "/api/v1/tokens", content=body, headers={**h, "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["code"] == "controller.too_large"
    assert _snapshot(svc) == before


def test_oversized_chunked_body_is_cut_off(svc, client, h):
    def gen():
        for _ in range(40):
            yield b" " * 65536

    r = client.post(
        "/api/v1/tokens", content=gen(), headers={**h, "Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_deeply_nested_json_is_refused(svc, client, h):
    before = _snapshot(svc)
    body = b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post(
        "/api/v1/rollouts", content=body, headers={**h, "Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500
    assert _snapshot(svc) == before


def test_huge_upload_is_cut_off_with_4xx_and_leaves_no_file(svc, client, h, data_dir):
    def gen():  # no Content-Length: the stream is counted as it arrives
        for _ in range(100):
            yield os.urandom(64 * 1024)

    r = client.post(
        "/api/v1/releases", content=gen(), headers={**h, "Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 413
    assert list((data_dir / "tmp").iterdir()) == []
    assert svc.releases.list_releases() == []


def test_declared_10_gib_upload_is_refused_before_reading(svc, client, h):
    r = client.post(
        "/api/v1/releases", content=b"x", headers={**h, "Content-Length": str(10 * 1024**3)}
    )
    assert r.status_code == 413


def test_garbage_upload_is_rejected_with_the_bundle_code(svc, client, h, fleet):
    r = client.post("/api/v1/releases", content=os.urandom(4096), headers=h)
    assert r.status_code == 422
    assert r.json()["code"].startswith("bundle.")
    assert svc.releases.list_releases() == []


def test_bundle_signed_by_unknown_key_is_rejected(svc, client, h, fleet, tmp_path):
    img = fleet.image("x")
    out = tmp_path / "forged.slb"
    build_bundle(
        img,
        out,
        release_keys=[SigningKey.generate()],
        version="6.6",
        hardware=["m1"],
        now=int(fleet.clock()),
    )
    r = client.post("/api/v1/releases", content=out.read_bytes(), headers=h)
    assert r.status_code == 422
    assert r.json()["code"] == "bundle.signature_invalid"
    assert svc.releases.list_releases() == []


@pytest.mark.parametrize(
    "bad", ["a+b", "%23", "a%2Fb", "..", "%24SYS", "%00", "*", "'; DROP TABLE devices; --"]
)
def test_ids_with_wildcards_or_path_characters_get_4xx(svc, client, h, bad):
    before = _snapshot(svc)
    for method, path in (
        ("GET", f"/api/v1/devices/{bad}"),
        ("POST", f"/api/v1/devices/{bad}/decommission"),
        ("GET", f"/api/v1/releases/{bad}"),
        ("PUT", f"/api/v1/sites/{bad}"),
    ):
        r = client.request(method, path, headers=h, json={"tz": "UTC"})
        assert 400 <= r.status_code < 500, (method, path, r.status_code)
        assert "code" in r.json() or "detail" in r.json()
    assert _snapshot(svc) == before


@pytest.mark.parametrize(
    "body",
    [
        {"site": "s1", "hardware_model": "m1", "ttl_seconds": 10**12},
        {"site": "s/1", "hardware_model": "m1"},
        {"site": "s1", "hardware_model": "m1", "extra": 1},
        {"site": "s1" * 100, "hardware_model": "m1"},
        {"site": None, "hardware_model": "m1"},
    ],
)
def test_malformed_enrollment_token_requests_get_422(svc, client, h, body):
    r = client.post("/api/v1/enrollment-tokens", headers=h, json=body)
    assert r.status_code == 422
    assert r.json()["code"] == "controller.invalid_input"


def test_injection_strings_are_plain_data(svc, client, h):
    r = client.put(
        "/api/v1/sites/s1", headers=h, json={"tz": "UTC'; DROP TABLE sites; --", "windows": []}
    )
    assert r.status_code == 422
    r = client.get("/api/v1/devices", headers=h, params={"site": "' OR 1=1 --"})
    assert r.status_code == 422
    r = client.post(
        "/api/v1/enroll",
        json={
            "token": "sle_' OR '1'='1",
            "device_id": "d1",
            "serial": "x",
            "hardware_model": "m1",
            "csr_pem": "x",
        },
    )
    assert r.status_code in (403, 422)
    assert svc.list_devices(SYSTEM) == []


def test_windows_and_time_zones_are_validated(svc, client, h):
    for body in (
        {"tz": "Mars/Olympus"},
        {"tz": "../../etc/passwd"},
        {"windows": [{"start": "25:00", "end": "01:00"}]},
        {"windows": [{"start": "01:00", "end": "02:00", "days": [9]}]},
    ):
        r = client.put("/api/v1/sites/s1", headers=h, json=body)
        assert r.status_code == 422, body
    assert svc.list_sites() == []
