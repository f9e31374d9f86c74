"""Self-test checks against real processes, sockets and an HTTP server."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time

import pytest

from agent.errors import ConfigInvalid, MigrationError
from agent.selftest import Check, CommandMigrations, SelfTestRunner


def run(checks, deadline=5.0, transport=None):
    return asyncio.run(SelfTestRunner(checks, deadline=deadline, transport=transport).run())


def test_command_checks() -> None:
    assert run([Check("command", argv=("true",))])[0]
    assert run([Check("command", argv=("sh", "-c", "exit 3"), expect_exit=3)])[0]
    ok, code, _ = run([Check("command", argv=("false",))])
    assert (ok, code) == (False, "selftest.failed")
    ok, code, _ = run([Check("command", argv=("/nonexistent/bin",))])
    assert (ok, code) == (False, "selftest.crashed")


def test_hanging_command_is_killed_at_its_timeout() -> None:
    t = time.monotonic()
    ok, code, _ = run([Check("command", argv=("sh", "-c", "sleep 30 & sleep 30"), timeout=0.3)])
    assert (ok, code) == (False, "selftest.timeout")
    assert time.monotonic() - t < 3


def test_overall_deadline() -> None:
    checks = [Check("command", argv=("sleep", "0.4"), timeout=5)] * 5
    ok, code, _ = run(checks, deadline=1.0)
    assert (ok, code) == (False, "selftest.timeout")


def test_tcp_probe() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        assert run([Check("tcp", host="127.0.0.1", port=port, timeout=2)])[0]
    finally:
        srv.close()
    ok, code, _ = run([Check("tcp", host="127.0.0.1", port=port, timeout=2)])
    assert (ok, code) == (False, "selftest.failed")


def test_http_probe() -> None:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert run([Check("http", url=base + "/health")])[0]
        ok, code, _ = run([Check("http", url=base + "/broken")])
        assert (ok, code) == (False, "selftest.failed")
    finally:
        server.shutdown()


def test_file_and_systemd_checks(tmp_path) -> None:
    (tmp_path / "ok").write_text("")
    assert run([Check("file", path=str(tmp_path / "ok"))])[0]
    assert not run([Check("file", path=str(tmp_path / "missing"))])[0]
    # no systemd in this container: the unit is not active (or systemctl is missing)
    ok, code, _ = run([Check("systemd", unit="slotline-surely-not-a-unit.service")])
    assert not ok
    assert code in ("selftest.failed", "selftest.crashed")


class _Link:
    """A Transport's reachable() as the simulator would implement it."""

    def __init__(self, up: bool, delay: float = 0.0, crash: bool = False) -> None:
        self.up, self.delay, self.crash = up, delay, crash

    async def reachable(self, timeout: float) -> bool:
        if self.crash:
            raise ConnectionError("link crashed")
        await asyncio.sleep(min(self.delay, timeout))
        return self.up and self.delay <= timeout


def test_controller_reachable_within_n_seconds() -> None:
    c = Check("controller", timeout=0.3)
    assert run([c], transport=_Link(True))[0]
    assert run([c], transport=_Link(False))[1] == "selftest.failed"
    assert run([c], transport=_Link(True, delay=1.0))[1] == "selftest.failed"
    assert run([c], transport=_Link(True, crash=True))[1] == "selftest.crashed"
    assert run([c])[1] == "selftest.crashed"


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "nope"},
        {"kind": "command"},
        {"kind": "tcp", "host": "x"},
        {"kind": "file", "path": "/x", "extra": 1},
        {"kind": "command", "argv": "true"},
        {"kind": "file", "path": "/x", "timeout": 0},
    ],
)
def test_bad_check_config(bad) -> None:
    with pytest.raises(ConfigInvalid):
        Check.from_mapping(bad)


def test_migration_hooks(tmp_path) -> None:
    out = tmp_path / "log"
    m = CommandMigrations(
        ("sh", "-c", f'echo "$SLOTLINE_FROM>$SLOTLINE_TO" >> {out}'),
        ("sh", "-c", f"echo undo >> {out}"),
    )
    asyncio.run(m.run("1.0", "2.0"))
    asyncio.run(m.undo("1.0", "2.0"))
    assert out.read_text() == "1.0>2.0\nundo\n"
    with pytest.raises(MigrationError):
        asyncio.run(CommandMigrations(("false",)).run(None, "2"))
    asyncio.run(CommandMigrations().run(None, "2"))  # no hooks: nothing to do
