"""Whole-system runs: real Mosquitto, real controller (SQLite and PostgreSQL), real agents.

Each test runs one small scenario through ``simulator.run.run`` (what ``slotline sim run``
does) and asserts on the fleet's own word: journals, boot envs and slot contents.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator import scenario
from simulator.report import counts
from simulator.run import RunOptions, run
from simulator.scenario import Outcome

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FLEET = """
[scenario]
name = "{name}"
seed = {seed}
timeout = "{timeout}s"

[firmware]
image_size = "128KiB"
chunk_size = "16KiB"

[[site]]
name = "plant"
latency = "2ms"

[[site]]
name = "remote"
bandwidth = "2Mbit"
latency = "50ms"
relay = true
metered = true

[[fleet]]
count = 6
hardware = "gw-100"
site = "plant"
tags = ["canary"]

[[fleet]]
count = 4
hardware = "gw-200"
site = "remote"
"""


def _run(tmp_path: Path, text: str, broker: str, database: str | None = None):
    s = scenario.parse(text, "e2e.toml")
    opts = RunOptions(broker_url=broker, database_url=database, work_dir=tmp_path / "run",
                      report_path=tmp_path / "report.json", connect_timeout=5, progress=False)
    return run(s, opts)


def test_staged_rollout_commits_everywhere_on_sqlite(tmp_path: Path, mosquitto_addr) -> None:
    host, port = mosquitto_addr
    text = FLEET.format(name="e2e-staged", seed=1, timeout=50) + """
[rollout]
trial = { tags = ["canary"], count = 2 }
phases = [50, 100]
max_failure_rate = 0

[expect]
rollout = "finished"
committed_min = 10

[[expect.sites]]
name = "remote"
wan_ratio_max = 1.1
"""
    result, checks, path = _run(tmp_path, text, f"mqtt://{host}:{port}")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert counts(result.devices)[Outcome.COMMITTED] == 10
    assert path.exists()


@pytest.mark.postgres
def test_failing_self_test_reverts_and_pauses_on_postgres(
    tmp_path: Path, mosquitto_addr, pg_schema_url: str
) -> None:
    host, port = mosquitto_addr
    text = FLEET.format(name="e2e-revert", seed=2, timeout=50) + """
[rollout]
trial = { tags = ["canary"], count = 2 }
phases = [100]
max_failure_rate = 10

[[fault]]
kind = "self_test_fail"
select = { hardware = "gw-200" }
version = "1.1.0"

[expect]
rollout = "paused"

[[expect.devices]]
select = { hardware = "gw-200" }
outcome = "reverted"
version = "1.0.0"
error = "selftest."

[[expect.devices]]
select = { tags = ["canary"] }
outcome = "committed"
version = "1.1.0"
"""
    result, checks, _ = _run(tmp_path, text, f"mqtt://{host}:{port}", pg_schema_url)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert counts(result.devices)[Outcome.BRICKED] == 0


def test_power_cut_mid_update_bricks_nothing(tmp_path: Path, mosquitto_addr) -> None:
    host, port = mosquitto_addr
    text = FLEET.format(name="e2e-power-cut", seed=3, timeout=30) + """
[rollout]
phases = [100]
max_failure_rate = 100

[[fault]]
kind = "power_cut"
at_step = "random"

[[fault]]
kind = "never_boots"
select = { hardware = "gw-200", count = 2 }
version = "1.1.0"

[expect]
bricked_max = 0
"""
    result, checks, _ = _run(tmp_path, text, f"mqtt://{host}:{port}")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    cut = [d for d in result.devices if d.power_cuts]
    assert len(cut) >= 5, "most devices should have lost power mid-update"
    never = [d for d in result.devices if "never_boots" in d.faults]
    assert all(d.version == "1.0.0" for d in never)
