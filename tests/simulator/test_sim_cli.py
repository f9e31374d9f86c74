"""`slotline sim`: bad scenarios and unreachable services fail fast with a clear message."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from agent.transport.broker import free_port

SLOTLINE = [sys.executable, "-c", "import slotline_cli; slotline_cli.main()"]


def _sim(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLOTLINE, "sim", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_check_reports_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[scenario]\nname = "x"\n\n[[site]]\nname = "a"\nbandwidth = "fast"\n'
                   '[[fleet]]\ncount = 1\nhardware = "h"\nsite = "a"\n[rollout]\n')
    out = _sim("check", str(bad))
    assert out.returncode == 2
    assert f"{bad}:6: site[0].bandwidth:" in out.stderr


def test_run_with_an_invalid_scenario_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[scenario]\nname = "x"\ntimeout = "soon"\n')
    out = _sim("run", str(bad))
    assert out.returncode == 2
    assert "scenario.timeout" in out.stderr


def test_shipped_scenarios_check_and_list() -> None:
    out = _sim("check", "smoke", "demo", "power_cut")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok: ") == 3
    listed = _sim("list")
    assert "power_cut" in listed.stdout
    assert "demo" in listed.stdout


def test_unreachable_broker_fails_within_seconds() -> None:
    port = free_port()  # nobody listens here
    start = time.monotonic()
    out = _sim("run", "smoke", "--broker", f"mqtt://127.0.0.1:{port}", "--connect-timeout", "2",
               "--no-progress")
    took = time.monotonic() - start
    assert out.returncode == 3, out.stderr
    assert "sim.unreachable" in out.stderr
    assert f"127.0.0.1:{port}" in out.stderr
    assert took < 15


def test_unreachable_database_fails_within_seconds(mosquitto_addr: tuple[str, int]) -> None:
    host, port = mosquitto_addr
    dead = free_port()
    start = time.monotonic()
    out = _sim("run", "smoke", "--broker", f"mqtt://{host}:{port}", "--database",
               f"postgresql+psycopg://postgres@127.0.0.1:{dead}/test?connect_timeout=2",
               "--connect-timeout", "2", "--no-progress")
    assert out.returncode == 3, out.stderr
    assert "controller database" in out.stderr
    assert time.monotonic() - start < 20
