"""Real links: devices in network namespaces behind a kernel-shaped veth, and nothing left behind.

The end-to-end tests need root, ``ip``, ``tc``, ``iptables`` and a broker the run can start; they
skip with the reason when one is missing, and fail instead under SLOTLINE_REQUIRE_SERVICES=1
(as tests/conftest.py does for Mosquitto and PostgreSQL).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.transport.broker import EmbeddedBroker
from simulator import netns, scenario
from simulator.errors import ScenarioInvalid
from simulator.netns_site import RealLinks
from simulator.scenario import Outcome
from simulator.wanproxy import DelayProxy

REQUIRE_SERVICES = os.environ.get("SLOTLINE_REQUIRE_SERVICES") == "1"
SCENARIO = Path(__file__).parents[2] / "simulator" / "scenarios" / "netns_link.toml"
SLOTLINE = [sys.executable, "-c", "import slotline_cli; slotline_cli.main()"]


def _need_real_links() -> None:
    try:
        netns.preflight(loss=True)
    except netns.NetnsUnavailable as e:
        if REQUIRE_SERVICES:
            pytest.fail(str(e))
        pytest.skip(str(e))
    if not EmbeddedBroker.available():
        msg = "no MQTT broker to start (mosquitto or iotcore)"
        if REQUIRE_SERVICES:
            pytest.fail(msg)
        pytest.skip(msg)


def _ours(pid: int) -> list[str]:
    """Namespaces, interfaces and root iptables rules that process ``pid``'s run made."""
    prefix = f"{netns.PREFIX}{pid}-"
    rules = [r for r in netns.sh("iptables", "-S", "INPUT").splitlines() if prefix in r]
    return netns.leftovers(prefix) + rules


# ----------------------------------------------------------------------------- validation


SITE = """\
[scenario]
name = "x"
[[site]]
name = "field"
bandwidth = "2Mbit"
netns = {netns}
{extra}
[[fleet]]
count = {count}
hardware = "gw"
site = "field"
[rollout]
"""


def _parse(netns_count: int, count: int = 4, extra: str = "", tail: str = "") -> scenario.Scenario:
    text = SITE.format(netns=netns_count, count=count, extra=extra) + tail
    return scenario.parse(text, "t.toml")


def test_netns_more_than_the_site_has_names_line_and_field() -> None:
    with pytest.raises(ScenarioInvalid) as e:
        _parse(5, count=4)
    assert str(e.value).startswith("t.toml:6: site[0].netns: site 'field' has only 4 devices")


def test_netns_above_the_run_bound_is_refused() -> None:
    with pytest.raises(ScenarioInvalid) as e:
        _parse(17, count=40)
    assert "at most 16 devices on real links" in str(e.value)


def test_netns_negative_is_refused() -> None:
    with pytest.raises(ScenarioInvalid) as e:
        _parse(-1)
    assert "site[0].netns: must be >= 0" in str(e.value)


def test_netns_with_a_relay_or_outages_is_refused() -> None:
    with pytest.raises(ScenarioInvalid) as e:
        _parse(2, extra="relay = true")
    assert "site[0].netns" in str(e.value)
    with pytest.raises(ScenarioInvalid) as e:
        _parse(2, extra='[[site.outage]]\nat = "1s"\nduration = "1s"')
    assert "outages are not applied to real links" in str(e.value)


def test_link_flap_on_a_real_link_is_refused() -> None:
    flap = '[[fault]]\nkind = "link_flap"\nsite = "field"\nduration = "1s"\nperiod = "5s"\n'
    with pytest.raises(ScenarioInvalid) as e:
        _parse(2, tail=flap)
    assert "fault[0].site: link_flap is not applied to real links" in str(e.value)


def test_shipped_scenario_places_four_devices_on_the_real_link() -> None:
    s = scenario.load(SCENARIO)
    from simulator.plan import fleet_specs  # noqa: PLC0415

    placed = RealLinks.placed(s, fleet_specs(s))
    assert {k: len(v) for k, v in placed.items()} == {"field": 4}
    assert scenario.to_json(s)["sites"][0]["netns"] == 4


# ----------------------------------------------------------------------------- missing pieces


def test_preflight_names_every_missing_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(netns.NetnsUnavailable) as e:
        netns.preflight(loss=True)
    msg = str(e.value)
    assert "root" in msg
    assert all(f"'{tool}'" in msg for tool in ("ip", "tc", "iptables"))
    assert e.value.code == "sim.netns_unavailable"


def test_cli_without_ip_and_tc_exits_non_zero_naming_them(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no ip, tc or iptables there
    out = subprocess.run([*SLOTLINE, "sim", "run", str(SCENARIO), "--no-progress"],
                         capture_output=True, text=True, timeout=60, check=False, env=env,
                         cwd=tmp_path)
    assert out.returncode == 1
    assert "sim.netns_unavailable" in out.stderr
    assert "'ip'" in out.stderr
    assert "'tc'" in out.stderr
    assert not list(tmp_path.glob("slotline-sim-*.json")), "nothing ran, nothing reported"


# ----------------------------------------------------------------------------- kernel links


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A loopback TCP echo server (the far end behind the relay)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield "127.0.0.1", srv.getsockname()[1]
    done.set()
    t.join(5)
    srv.close()


PING = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.monotonic(); s.sendall(b"x"); s.recv(1); rtts.append(time.monotonic() - t)
print(min(rtts))
"""


@pytest.mark.netns
def test_real_link_round_trip_carries_the_latency_both_ways(echo_server: tuple[str, int]) -> None:
    _need_real_links()
    (host_ip, ns_ip), = netns.free_subnets(1)
    veth = dataclasses.replace(netns.owned(os.getpid(), 15), host_ip=host_ip, ns_ip=ns_ip)
    link = netns.create(veth, netns.Shape(rate_bps=2_000_000, latency=0.04))
    proxy = DelayProxy(host_ip, echo_server, 0.04 if link.latency_by == "none" else 0.0)
    try:
        port = proxy.start()
        out = subprocess.run(["ip", "netns", "exec", veth.ns, sys.executable, "-c", PING,
                              host_ip, str(port)],
                             capture_output=True, text=True, timeout=30, check=True)
        rtt = float(out.stdout)
    finally:
        proxy.stop()
        netns.destroy(link)
    # A lower bound only: a delay line can be late on a busy machine, never early.
    assert rtt >= 0.08 * 0.98, f"round trip {rtt * 1000:.1f} ms < 2 x 40 ms"
    assert not _ours(os.getpid())


@pytest.mark.netns
def test_leftovers_of_a_killed_run_are_removed_live_runs_are_not() -> None:
    _need_real_links()
    gone = subprocess.Popen(["true"])
    gone.wait()
    addrs = netns.free_subnets(2)
    dead = dataclasses.replace(netns.owned(gone.pid, 3), host_ip=addrs[0][0], ns_ip=addrs[0][1])
    live = dataclasses.replace(netns.owned(os.getpid(), 14), host_ip=addrs[1][0],
                               ns_ip=addrs[1][1])
    links = [netns.create(dead, netns.Shape(rate_bps=1_000_000, uplink_loss=0.02)),
             netns.create(live, netns.Shape(rate_bps=1_000_000))]
    try:
        removed = netns.clean_stale()
        assert dead.ns in removed
        assert any(dead.host_if in r for r in removed), "its root iptables rule too"
        assert not _ours(gone.pid)
        assert netns.exists(live.ns), "a live run's link is not a leftover"
    finally:
        for link in links:
            netns.destroy(link)
    assert not _ours(os.getpid())


# ----------------------------------------------------------------------------- end to end


@pytest.mark.netns
@pytest.mark.slow
def test_netns_link_scenario_commits_over_the_real_link(tmp_path: Path) -> None:
    _need_real_links()
    from simulator.run import RunOptions, run  # noqa: PLC0415

    s = scenario.load(SCENARIO)
    result, checks, path = run(s, RunOptions(progress=False, work_dir=tmp_path / "work",
                                             report_path=tmp_path / "report.json"))
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    real = [d for d in result.devices if d.link == "netns"]
    assert len(real) == 4
    assert {d.site for d in real} == {"field"}
    assert all(d.outcome is Outcome.COMMITTED and d.version == "1.1.0" for d in real)
    assert sum(d.outcome is Outcome.COMMITTED for d in result.devices) == 8

    (link,) = result.real_links
    # Every real-link device pulled the whole bundle through the veth (the model did not carry
    # it): the downlink counted at the host end holds four bundles plus TCP/MQTT overhead.
    assert link["downlink_bytes"] >= 4 * result.bundle_bytes
    assert link["relay_connections"] >= 4
    assert link["latency_by"] in {"netem", "relay"}
    assert link["measured_bps"] is not None
    # The shaper was in the path: an unshaped veth moves hundreds of Mbit/s. (An upper bound:
    # a slow machine can only make it lower.)
    assert link["measured_bps"] <= 1.25 * link["rate_bps"]

    doc = json.loads(path.read_text())
    assert doc["real_links"][0]["namespace"] == link["namespace"]
    assert sorted(d["device_id"] for d in doc["devices"] if d["link"] == "netns") == sorted(
        d.device_id for d in real)
    assert not _ours(os.getpid())


@pytest.mark.netns
@pytest.mark.slow
def test_sigterm_mid_run_removes_the_real_links(tmp_path: Path) -> None:
    _need_real_links()
    proc = subprocess.Popen([*SLOTLINE, "sim", "run", str(SCENARIO), "--no-progress",
                             "--report", str(tmp_path / "r.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 40
        while not netns.leftovers(f"{netns.PREFIX}{proc.pid}-") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        assert netns.leftovers(f"{netns.PREFIX}{proc.pid}-"), "the run made its link"
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0
    assert not _ours(proc.pid)


def test_cli_netns_override_is_validated_like_the_field(tmp_path: Path) -> None:
    for arg, expected in (("nowhere=2", "--netns: unknown site 'nowhere'"),
                          ("plant=11", "site 'plant' has only 10 devices"),
                          ("plant", "expected SITE=N")):
        out = subprocess.run([*SLOTLINE, "sim", "run", "smoke", "--netns", arg, "--no-progress"],
                             capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
        assert out.returncode == 2, (arg, out.stderr)
        assert expected in out.stderr, (arg, out.stderr)


def test_with_netns_sets_the_count_of_one_site() -> None:
    s = scenario.with_netns(scenario.load(SCENARIO), "plant", 2)
    assert {x.name: x.netns for x in s.sites} == {"field": 4, "plant": 2}
