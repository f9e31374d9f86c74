"""The operator dashboard: pages over a real rollout, escaping, log in, roles, paging at scale.

Every test runs on SQLite and on PostgreSQL (the ``svc`` fixture's ``db_url`` parameter); the
rollout is made through the service API and moved by real device reports.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import select as io_select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import insert, select
from starlette.testclient import TestClient

from agent.transport.broker import free_port
from controller.api.app import create_app
from controller.auth import Role
from controller.dashboard.queries import gate_checks
from controller.dashboard.session import SESSION_SECONDS, SessionSigner, load_key
from controller.db import models as m
from controller.rollout import planner as p
from controller.rollout.scheduler import PhaseSpec
from controller.service import SYSTEM
from firmware_bundles.bundle import hash_file

HOSTILE = "<script>alert('x')</script>"
HOSTILE_ATTR = '"><img src=x onerror=alert(1)>'
PAGES = ("/dashboard/", "/dashboard/rollouts", "/dashboard/devices", "/dashboard/releases")


def _last_command(svc, device_id):
    with svc.sessions() as s:
        row = s.scalars(
            select(m.Command).where(m.Command.device_id == device_id).order_by(m.Command.id.desc())
        ).first()
    return json.loads(row.body)["signed"]


@pytest.fixture
def world(svc, fleet, clock):
    """Two releases, eight devices at two sites, one reporting hostile strings, and a rollout
    whose trial group failed its gate (one device committed, one failed): PAUSED with a reason."""
    v1 = fleet.image("v1", seed=1)
    v2 = fleet.mutate(v1, "v2")
    d1 = hash_file(v1).sha256
    fleet.upload(fleet.bundle(v1, "1.0"))
    rel = fleet.upload(fleet.bundle(v2, "2.0"))
    devices = fleet.enroll(6, site="s1", digest=d1) + fleet.enroll(
        2, site="s2", prefix="e", digest=d1
    )
    evil = devices[1]
    svc.on_state(
        evil,
        {
            "active_digest": d1,
            "phase": HOSTILE,
            "primary": HOSTILE_ATTR,
            "versions": {HOSTILE: HOSTILE_ATTR},
            "health": {HOSTILE: 3},
        },
    )
    svc.drain_reports()
    ro = svc.scheduler.create(
        fleet.ops,
        name="tuesday",
        release_id=rel["bundle_id"],
        trial_devices=devices[:2],
        trial_gate=p.Gate(min_successes=1, max_failure_pct=0),
        phases=[PhaseSpec("half", 50, p.Gate()), PhaseSpec("all", 100, p.Gate())],
        max_in_flight=10,
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()  # starts the trial group
    svc.tick()  # commands it
    bundle = _last_command(svc, devices[0])["args"]["bundle_id"]
    svc.on_event(devices[0], {"type": "result", "outcome": "committed", "bundle_id": bundle})
    svc.on_event(evil, {"type": "phase", "phase": "writing", "progress": 40})
    svc.on_event(
        evil, {"type": "result", "outcome": "reverted", "bundle_id": bundle, "code": HOSTILE}
    )
    clock.now += 10
    svc.tick()
    status = svc.scheduler.status(ro["id"])
    assert status["state"] == "paused", status
    return {"rollout": ro["id"], "devices": devices, "evil": evil, "release": rel, "d1": d1}


@pytest.fixture
def client(svc):
    with TestClient(create_app(svc)) as c:
        yield c


@pytest.fixture
def viewer(svc):
    return svc.issue_api_token(SYSTEM, "wall-screen", Role.VIEWER, ())


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def _login(client, token, next_path="/dashboard/"):
    return client.post(
        "/dashboard/login", data={"token": token, "next": next_path}, follow_redirects=False
    )


def _all_pages(world):
    return (
        *PAGES,
        f"/dashboard/rollouts/{world['rollout']}",
        f"/dashboard/devices/{world['evil']}",
        f"/dashboard/devices/{world['devices'][0]}",
        "/dashboard/devices?site=s1&state=failed",
    )


# ---------------------------------------------------------------------- pages


def test_every_page_renders_the_paused_rollout_and_its_reason(client, world, viewer):
    assert _login(client, viewer).status_code == 303
    rid = world["rollout"]

    ov = client.get("/dashboard/")
    assert ov.status_code == 200, ov.text
    assert "tuesday" in ov.text
    assert "paused" in ov.text
    assert 'http-equiv="refresh"' in ov.text  # auto-refresh
    assert re.search(r"<b>8</b><span>active devices</span>", ov.text)
    assert "rootfs 1.0" in ov.text  # the version the fleet runs, from the active digests
    assert "s2</a></td><td>2</td>" in ov.text

    rl = client.get("/dashboard/rollouts")
    assert f'href="/dashboard/rollouts/{rid}"' in rl.text
    assert "rootfs 2.0" in rl.text

    rd = client.get(f"/dashboard/rollouts/{rid}")
    assert rd.status_code == 200
    for text in ("trial", "half", "all", "FailGroup", "PauseRollout", "start", "create"):
        assert text in rd.text, text
    # the recorded pause reason, as the planner wrote it (quotes escaped)
    assert "group &#x27;trial&#x27;: 1 of 2 devices failed (more than 0%)" in rd.text
    assert "succeeded 1 · failed 1 · in flight 0 · waiting 0" in rd.text
    assert "not met" in rd.text  # the failure condition of the gate

    dl = client.get("/dashboard/devices")
    assert "page 1 of 1 · 8 devices" in dl.text
    failed = client.get("/dashboard/devices?state=failed")
    assert "1 devices" in failed.text
    assert world["evil"] in failed.text
    s2 = client.get("/dashboard/devices?site=s2")
    assert "2 devices" in s2.text
    assert "e0000" in s2.text
    assert "d0000" not in s2.text
    by_image = client.get(f"/dashboard/devices?image={world['d1']}")
    assert "8 devices" in by_image.text

    ok = client.get(f"/dashboard/devices/{world['devices'][0]}")
    assert "succeeded" in ok.text
    assert f"rollout #{rid} tuesday" in ok.text
    assert "install command #1 (not yet published)" in ok.text  # no gateway here
    assert "device.enroll by enroll:d0000" in ok.text

    rel = client.get("/dashboard/releases")
    assert "2.0" in rel.text
    assert world["release"]["bundle_id"] in rel.text


def test_a_device_reporting_markup_is_shown_escaped(client, world, viewer):
    for path in _all_pages(world):
        r = client.get(path, headers=_bearer(viewer))
        assert r.status_code == 200, (path, r.text)
        assert "<script" not in r.text, path
        assert "<img" not in r.text, path
        assert "script-src" not in r.headers["content-security-policy"]  # no script allowed
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
    page = client.get(f"/dashboard/devices/{world['evil']}", headers=_bearer(viewer)).text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page  # error code, phase...
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page  # primary slot, version
    assert "error code" in page


def test_unknown_pages_and_bad_filters_answer_with_a_page_not_a_500(client, world, viewer):
    h = _bearer(viewer)
    assert client.get("/dashboard/rollouts/999999", headers=h).status_code == 404
    assert client.get("/dashboard/rollouts/0", headers=h).status_code == 422
    assert client.get("/dashboard/devices/nope", headers=h).status_code == 404
    assert client.get("/dashboard/devices/a%2Fb", headers=h).status_code in {404, 422}
    assert client.get("/dashboard/devices?state=weird", headers=h).status_code == 422
    assert client.get("/dashboard/devices?image=zz", headers=h).status_code == 422
    assert client.get("/dashboard/devices?page=-1", headers=h).status_code == 422
    r = client.get(f"/dashboard/devices?site={HOSTILE}", headers=h)
    assert r.status_code == 422
    assert "<script" not in r.text


def test_the_dashboard_is_not_part_of_the_api_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [x for x in paths if x.startswith("/dashboard")]
    css = client.get("/dashboard/static/dashboard.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert ".w100{width:100%}" in css.text
    assert client.get("/dashboard", follow_redirects=False).status_code in {307, 308}


# ---------------------------------------------------------------------- who may look


def test_no_token_wrong_token_and_field_engineer_are_refused(svc, client, world):
    for path in _all_pages(world):
        r = client.get(path)
        assert r.status_code == 401, path
        assert 'name="token"' in r.text
        assert "rootfs" not in r.text
        assert "tuesday" not in r.text
    wrong = {"Authorization": "Bearer slt_" + "x" * 43}
    assert client.get("/dashboard/", headers=wrong).status_code == 401
    assert (
        client.get("/dashboard/", headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code
        == 401
    )
    assert client.get("/dashboard/", cookies={"slotline_session": "forged.cafe"}).status_code == 401

    fe = svc.issue_api_token(SYSTEM, "field", Role.FIELD_ENGINEER, ("s1",))
    r = client.get("/dashboard/devices", headers=_bearer(fe))
    assert r.status_code == 403
    assert "d0000" not in r.text
    r = _login(client, fe)
    assert r.status_code == 403
    assert "set-cookie" not in r.headers
    assert _login(client, "slt_" + "y" * 43).status_code == 401
    for role in (Role.VIEWER, Role.OPERATOR, Role.ADMIN):
        tok = svc.issue_api_token(SYSTEM, f"t-{role.value}", role, ())
        assert client.get("/dashboard/", headers=_bearer(tok)).status_code == 200, role


def test_login_sets_a_strict_httponly_session_that_logout_and_revocation_end(
    svc, world, viewer, clock
):
    with TestClient(create_app(svc)) as client:
        r = _login(client, viewer, f"/dashboard/devices/{world['evil']}")
        assert r.status_code == 303
        assert r.headers["location"] == f"/dashboard/devices/{world['evil']}"
        cookie = r.headers["set-cookie"]
        for attr in (
            "HttpOnly",
            "SameSite=strict",
            "Path=/dashboard",
            f"Max-Age={SESSION_SECONDS}",
        ):
            assert attr.lower() in cookie.lower(), cookie
        assert viewer not in cookie  # the cookie names the token by hash, signed
        assert client.get("/dashboard/rollouts").status_code == 200

        out = client.post("/dashboard/logout", follow_redirects=False)
        assert out.status_code == 303
        assert "max-age=0" in out.headers["set-cookie"].lower()
        assert client.get("/dashboard/rollouts").status_code == 401

        assert _login(client, viewer).status_code == 303
        clock.now += SESSION_SECONDS + 1
        assert client.get("/dashboard/").status_code == 401  # expired
        clock.now -= SESSION_SECONDS + 1

        assert _login(client, viewer).status_code == 303
        assert client.get("/dashboard/").status_code == 200
        token_id = next(t["id"] for t in svc.list_api_tokens() if t["name"] == "wall-screen")
        svc.revoke_api_token(SYSTEM, token_id)
        assert client.get("/dashboard/").status_code == 401  # revoked: the session dies with it


def test_login_never_redirects_off_the_dashboard_nor_accepts_a_cross_site_post(svc, client, viewer):
    for evil in (
        "https://evil.example/",
        "//evil.example/x",
        "/api/v1/tokens",
        "/dashboard\\..",
        "",
    ):
        r = _login(client, viewer, evil)
        assert r.status_code == 303, evil
        assert r.headers["location"] == "/dashboard/", evil
    r = client.post(
        "/dashboard/login",
        data={"token": viewer},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert r.status_code == 403
    assert "set-cookie" not in r.headers


def test_the_session_key_is_made_once_private_and_kept(tmp_path):
    key = load_key(tmp_path)
    assert len(key) == 32
    assert (tmp_path / "dashboard.key").stat().st_mode & 0o777 == 0o600
    assert load_key(tmp_path) == key  # a restart keeps the sessions
    assert not [p for p in tmp_path.iterdir() if p.name != "dashboard.key"]  # no temp left


def test_session_values_cannot_be_forged_or_extended():
    signer = SessionSigner(b"k" * 32, ttl=60)
    other = SessionSigner(b"j" * 32, ttl=60)
    value = signer.issue("ab" * 32, now=1000)
    assert signer.verify(value, now=1059) == "ab" * 32
    assert signer.verify(value, now=1060) is None
    assert other.verify(value, now=1000) is None
    payload, mac = value.split(".")
    assert signer.verify(payload[:-2] + "xx." + mac, now=1000) is None
    for junk in ("", ".", "a.b.c", "é" * 10, "x" * 5000):
        assert signer.verify(junk, now=1000) is None


# ---------------------------------------------------------------------- scale


def test_pages_stay_fast_with_thousands_of_devices(svc, fleet, clock, viewer):
    """3000 devices (plus the enrolled ones) in one rollout, 200 in flight: every page is one
    bounded set of queries, the device list 50 rows a page."""
    v1 = fleet.image("v1", seed=1)
    v2 = fleet.mutate(v1, "v2")
    d1 = hash_file(v1).sha256
    fleet.upload(fleet.bundle(v1, "1.0"))
    rel = fleet.upload(fleet.bundle(v2, "2.0"))
    n = 3000
    enrolled = dt.datetime.fromtimestamp(clock(), dt.UTC)
    rows = [
        {
            "id": f"gw-{i:05d}",
            "hardware_model": "m1",
            "serial": f"SN{i}",
            "site": f"site-{i % 7}",
            "tags": [],
            "status": "active",
            "cert_serial": f"{i:x}",
            "enrolled_at": enrolled,
            "online": i % 3 != 0,
            "active_digest": d1,
            "versions": {},
            "health": {},
            "state": {"phase": "idle"},
            "command_counter": 0,
        }
        for i in range(n)
    ]
    with svc.sessions.begin() as s:
        s.execute(insert(m.Device), rows)
    ro = svc.scheduler.create(
        fleet.ops,
        name="big",
        release_id=rel["bundle_id"],
        phases=[PhaseSpec("all", 100, p.Gate())],
        max_in_flight=200,
    )
    svc.scheduler.start(fleet.ops, ro["id"])
    svc.tick()
    svc.tick()
    with TestClient(create_app(svc)) as client:
        h = _bearer(viewer)
        timings = {}
        for path in (
            "/dashboard/",
            "/dashboard/devices",
            "/dashboard/devices?page=40",
            "/dashboard/devices?state=updating",
            "/dashboard/devices?state=offline&site=site-3",
            f"/dashboard/rollouts/{ro['id']}",
            "/dashboard/rollouts",
            "/dashboard/devices/gw-01234",
            "/dashboard/releases",
        ):
            client.get(path, headers=h)  # warm
            t0 = time.perf_counter()
            r = client.get(path, headers=h)
            timings[path] = time.perf_counter() - t0
            assert r.status_code == 200, (path, r.text[:500])
        print({k: round(v * 1000) for k, v in timings.items()})
        assert max(timings.values()) < 1.0, timings
        page = client.get("/dashboard/devices?page=40", headers=h).text
        assert page.count('href="/dashboard/devices/gw-') == 50
        assert f"page 40 of {-(-n // 50)}" in page
        updating = client.get("/dashboard/devices?state=updating", headers=h).text
        assert "200 devices" in updating
        ov = client.get("/dashboard/", headers=h).text
        assert f"<b>{n}</b><span>active devices</span>" in ov


# ---------------------------------------------------------------------- a real browser


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (child fds 3 and 4)."""

    def __init__(self, browser, profile):
        to_child_r, self.w = os.pipe()
        self.r, from_child_w = os.pipe()

        def fds():  # runs in the child: its fd 3 reads our commands, fd 4 writes answers
            os.dup2(to_child_r, 100)
            os.dup2(from_child_w, 101)
            os.dup2(100, 3)
            os.dup2(101, 4)

        self.proc = subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            preexec_fn=fds,  # noqa: PLW1509 (a test, single-threaded here)
            close_fds=False,  # fds 3 and 4 are set up by fds() above
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf = b""
        self.next_id = 0
        self.events = []

    def _read(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, "chromium did not answer in time"
            ready, _, _ = io_select.select([self.r], [], [], left)
            if ready:
                data = os.read(self.r, 1 << 20)
                assert data, "chromium closed the pipe"
                self.buf += data
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method, params=None, session=None, timeout=30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self.next_id:
                assert "error" not in answer, answer
                return answer["result"]
            self.events.append(answer)

    def wait_for(self, method, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def close(self):
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


@pytest.mark.slow
def test_headless_chromium_logs_in_and_runs_no_device_script(svc, world, viewer, tmp_path):
    """The real served app in a real browser: the login form sets an HttpOnly cookie that
    scripts cannot read, the stylesheet loads under the CSP, and the device reporting markup
    opens no dialog. Screenshots go to $SLOTLINE_DASHBOARD_SHOTS when set (docs)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium installed (apt-get install chromium)")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    cdp = None
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}/dashboard"
        cdp = _DevTools(browser, tmp_path / "profile")
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        cdp.call("Page.enable", session=sid)
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=sid,
        )

        def go(url):
            cdp.call("Page.navigate", {"url": url}, session=sid)
            cdp.wait_for("Page.loadEventFired")

        def js(expr):
            r = cdp.call(
                "Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sid
            )
            return r["result"].get("value")

        def shot(name):
            png = base64.b64decode(
                cdp.call("Page.captureScreenshot", {"format": "png"}, session=sid)["data"]
            )
            assert len(png) > 10_000
            keep = os.environ.get("SLOTLINE_DASHBOARD_SHOTS")
            if keep:
                (Path(keep) / f"{name}.png").write_bytes(png)

        go(f"{base}/rollouts/{world['rollout']}?refresh=0")
        assert js("document.querySelector('input[name=token]') !== null")  # not logged in
        shot("login")
        js(
            f"document.getElementById('token').value = {json.dumps(viewer)};"
            "document.querySelector('form.login').submit()"
        )
        cdp.wait_for("Page.loadEventFired")
        assert js("location.pathname") == f"/dashboard/rollouts/{world['rollout']}"
        assert js("document.cookie") == ""  # HttpOnly: no script can read the session
        assert js("getComputedStyle(document.querySelector('header')).backgroundColor") == (
            "rgb(29, 35, 48)"
        )  # the stylesheet loaded under the CSP
        assert "PauseRollout" in js("document.body.innerText")
        shot("rollout")
        go(f"{base}/devices/{world['evil']}?refresh=0")
        assert HOSTILE in js("document.body.innerText")  # shown as text...
        assert js("document.querySelectorAll('script, img').length") == 0  # ...never as markup
        shot("device")
        go(f"{base}/?refresh=0")
        shot("overview")
        assert not [e for e in cdp.events if e.get("method") == "Page.javascriptDialogOpening"]
    finally:
        if cdp is not None:
            cdp.close()
        server.should_exit = True
        thread.join(timeout=10)


def test_an_image_only_a_delta_starts_from_is_named_by_that_delta(svc, fleet, client, viewer):
    v1 = fleet.image("v1", seed=1)
    v2 = fleet.mutate(v1, "v2")
    fleet.upload(fleet.bundle(v2, "2.0", base=v1))  # no release targets v1 itself
    fleet.enroll(3, digest=hash_file(v1).sha256)
    fleet.enroll(1, prefix="n")  # reported no digest yet
    page = client.get("/dashboard/", headers=_bearer(viewer)).text
    assert f"{hash_file(v1).sha256[:12]} (delta base of rootfs 2.0)</a></td><td>3<" in page
    assert "not reported</a></td><td>1<" in page
    listed = client.get("/dashboard/devices?image=none", headers=_bearer(viewer)).text
    assert "1 devices" in listed
    assert "n0000" in listed


def test_gate_conditions_mirror_the_planner_and_a_waiting_group_fails_none():
    gate = {"min_successes": 5, "threshold_pct": 90, "max_failure_pct": 10, "soak_seconds": 60}
    counts = {"succeeded": 8, "failed": 2, "scheduled": 0}
    checks = {
        c.name: c
        for c in gate_checks(gate, counts, total=10, acknowledged=1, gate_met_at=1000.0, now=1030.0)
    }
    assert checks["successes"].ok
    assert checks["done"].ok  # 100 % >= 90 %
    assert checks["failures"].ok  # 2 failed, 1 acknowledged by a resume: 10 % is allowed
    assert checks["soak"].ok is False
    assert checks["soak"].value == "30 s since gate met"
    waiting = gate_checks(
        gate, {"scheduled": 10}, total=10, acknowledged=0, gate_met_at=None, now=0.0, started=False
    )
    assert {c.ok for c in waiting} == {None}
