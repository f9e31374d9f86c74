"""Every route x every role, plus missing, malformed and unknown tokens."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute
from starlette.testclient import TestClient

from agent.enroll_cli import make_csr
from controller.api.app import create_app
from controller.api.guard import ROUTE_PERMS
from controller.auth import ALLOWED, Role
from controller.service import SYSTEM, Principal

PUBLIC = {"healthz", "enroll", "openapi", "swagger_ui_html", "swagger_ui_redirect", "redoc_html"}
PARAMS = {
    "device_id": "gw-1",
    "rollout_id": "1",
    "token_id": "999999",
    "name": "s1",
    "bundle_id": "b1",
}


@pytest.fixture
def client(svc):
    with TestClient(create_app(svc)) as c:
        yield c


def _routes(app):
    for r in app.app.routes:
        if isinstance(r, APIRoute):
            for method in r.methods:
                yield r.name, method, re.sub(r"{(\w+)}", lambda m: PARAMS[m.group(1)], r.path)


def _tokens(svc):
    return {role: svc.issue_api_token(SYSTEM, f"t-{role.value}", role, ("s1",)) for role in Role}


def test_every_route_declares_a_permission_or_is_public(svc):
    app = create_app(svc)
    names = {name for name, _, _ in _routes(app)}
    assert names - set(ROUTE_PERMS) <= PUBLIC
    assert {"healthz", "enroll"} <= names - set(ROUTE_PERMS)


def test_routes_by_roles(svc, client):
    tokens = _tokens(svc)
    checked = 0
    for name, method, path in _routes(client.app):
        perm = ROUTE_PERMS.get(name)
        if perm is None:
            continue
        for header in (None, "Bearer", "Basic abc", "Bearer slt_" + "A" * 43, "Bearer \xff"):
            headers = {} if header is None else {"Authorization": header.encode("latin-1")}
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (name, header, r.status_code)
            assert r.json()["code"] == "auth.unauthorized"
        for role, token in tokens.items():
            r = client.request(method, path, headers={"Authorization": f"Bearer {token}"}, json={})
            if role in ALLOWED[perm]:
                assert r.status_code not in (401, 403), (name, role, r.text)
                assert r.status_code < 500, (name, role, r.text)
            else:
                assert r.status_code == 403, (name, role, r.status_code)
                assert r.json()["code"] == "auth.forbidden"
            checked += 1
    assert checked >= 20 * len(Role)


def test_revoked_token_is_refused(svc, client):
    token = svc.issue_api_token(SYSTEM, "gone", Role.ADMIN, ())
    tid = next(t["id"] for t in svc.list_api_tokens() if t["name"] == "gone")
    svc.revoke_api_token(SYSTEM, tid)
    assert (
        client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )


def test_healthz_and_openapi_need_no_token(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    assert "/api/v1/rollouts/{rollout_id}/rollback" in spec["paths"]


def test_field_engineer_sees_only_devices_of_its_sites(svc, client):
    ops = Principal("ops", Role.OPERATOR)
    for i, site in enumerate(["s1", "s2"]):
        tok = svc.issue_enrollment_token(ops, site, "m1")["token"]
        svc.enroll(tok, f"d{i}", "SN", "m1", make_csr(f"d{i}")[1].decode())
    fe = svc.issue_api_token(SYSTEM, "fe", Role.FIELD_ENGINEER, ("s1",))
    h = {"Authorization": f"Bearer {fe}"}
    assert [d["id"] for d in client.get("/api/v1/devices", headers=h).json()] == ["d0"]
    assert client.get("/api/v1/devices/d1", headers=h).status_code == 404
