"""Scenario validation: every mistake names its file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator import scenario
from simulator.errors import ScenarioInvalid
from simulator.scenario import FaultKind, Outcome, RolloutEnd

GOOD = """\
[scenario]
name = "two sites"
seed = 7
timeout = "90s"

[firmware]
image_size = "1MiB"
chunk_size = "32KiB"

[[site]]
name = "north"
bandwidth = "20Mbit"
latency = "20ms"

[[site]]
name = "remote"
bandwidth = "256kbit"
relay = true
metered = true
[[site.outage]]
at = "10s"
duration = "2s"

[[fleet]]
count = 20
hardware = "gw-100"
site = "north"
tags = ["trial"]

[[fleet]]
count = 5
hardware = "gw-200"
site = "remote"

[rollout]
trial = { tags = ["trial"], count = 3 }
phases = [10, 50, 100]
max_failure_rate = 20
soak = "1s"

[[fault]]
kind = "self_test_fail"
select = { hardware = "gw-200" }
version = "1.1.0"

[[fault]]
kind = "power_cut"
select = { count = 2 }
at_step = 3

[expect]
rollout = "paused"
bricked_max = 0

[[expect.devices]]
select = { hardware = "gw-200" }
outcome = "reverted"
version = "1.0.0"
"""


def _error(text: str) -> ScenarioInvalid:
    with pytest.raises(ScenarioInvalid) as info:
        scenario.parse(text, "s.toml")
    return info.value


def test_good_scenario_parses_into_values() -> None:
    s = scenario.parse(GOOD, "s.toml")
    assert s.meta.timeout == 90
    assert s.device_count == 25
    assert s.firmware.chunk_size == 32 * 1024
    remote = s.site("remote")
    assert remote.bandwidth == 256_000
    assert remote.relay
    assert remote.outages[0].at == 10
    assert s.site("north").latency == pytest.approx(0.02)
    assert s.rollout.trial is not None
    assert s.rollout.trial.count == 3
    assert [f.kind for f in s.faults] == [FaultKind.SELF_TEST_FAIL, FaultKind.POWER_CUT]
    assert s.faults[1].at_step == 3
    assert s.expect.rollout is RolloutEnd.PAUSED
    assert s.expect.devices[0].outcome is Outcome.REVERTED


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "words"),
    [
        ('kind = "power_cut"', 'kind = "powercut"', 47, "fault[1].kind", "unknown value 'powercut'"),
        ('bandwidth = "256kbit"', 'bandwidth = "256kbits"', 17, "site[1].bandwidth", "unit"),
        ('site = "remote"\n', 'site = "moon"\n', 33, "fleet[1].site", "unknown site 'moon'"),
        ('at = "10s"', 'at = "ten"', 21, "site[1].outage[0].at", "not a duration"),
        ("count = 20\n", "count = 0\n", 25, "fleet[0].count", ">= 1"),
        ("phases = [10, 50, 100]", "phases = [10, 50, 90]", 37, "rollout.phases[2]", "100"),
        ("phases = [10, 50, 100]", "phases = [50, 10, 100]", 37, "rollout.phases[1]", "grow"),
        ("max_failure_rate = 20", "max_failure_rate = 200", 38, "rollout.max_failure_rate", "<= 100"),
        ('outcome = "reverted"', 'outcome = "fine"', 57, "expect.devices[0].outcome", "fine"),
        ("seed = 7", "sed = 7", 3, "scenario.sed", "unknown field 'sed'"),
        ("select = { count = 2 }", "select = { cuont = 2 }", 48, "fault[1].select.cuont", "unknown field"),
        ("at_step = 3", "at_step = -3", 49, "fault[1].at_step", ">= 0"),
        ('version = "1.1.0"', 'version = "9.9"', 44, "fault[0].version", "no firmware"),
        ('select = { hardware = "gw-200" }\nversion', 'select = { hardware = "gw-300" }\nversion',
         43, "fault[0].select.hardware", "gw-300"),
    ],
)
def test_mistake_names_line_and_field(old: str, new: str, line: int, field: str, words: str | None) -> None:
    assert old in GOOD
    e = _error(GOOD.replace(old, new, 1))
    assert e.field == field, str(e)
    assert e.line == line, str(e)
    if words:
        assert words in e.reason, str(e)
    assert str(e).startswith(f"s.toml:{line}: {field}: ")


def test_missing_required_field_points_at_its_table() -> None:
    e = _error(GOOD.replace('hardware = "gw-100"\n', "", 1))
    assert e.field == "fleet[0].hardware"
    assert e.line == 24  # the [[fleet]] header
    assert "missing" in e.reason


def test_missing_scenario_table() -> None:
    e = _error(GOOD.replace("[scenario]\n", "[scenari]\n"))
    assert "scenari" in e.field or e.field == "scenario"


def test_toml_syntax_error_keeps_the_line() -> None:
    e = _error(GOOD.replace("seed = 7", "seed = = 7"))
    assert e.line == 3
    assert "not valid TOML" in e.reason


def test_type_mistakes_are_named() -> None:
    e = _error(GOOD.replace("relay = true", 'relay = "yes"'))
    assert (e.field, e.line) == ("site[1].relay", 18)
    e = _error(GOOD.replace("seed = 7", 'seed = "7"'))
    assert (e.field, e.line) == ("scenario.seed", 3)


def test_duplicate_site_and_flap_rules() -> None:
    e = _error(GOOD.replace('name = "remote"', 'name = "north"'))
    assert (e.field, e.line) == ("site[1].name", 16)
    flap = GOOD + '\n[[fault]]\nkind = "link_flap"\nsite = "remote"\nperiod = "2s"\nduration = "3s"\n'
    e = _error(flap)
    assert e.field == "fault[2].duration"
    assert "up part" in e.reason


def test_multiline_array_elements_have_lines() -> None:
    text = GOOD.replace("phases = [10, 50, 100]", "phases = [\n  10,\n  50,\n  100,\n]")
    assert scenario.parse(text).rollout.phases == (10, 50, 100)


def test_shipped_scenarios_are_valid() -> None:
    root = Path(scenario.__file__).parent / "scenarios"
    files = sorted(root.glob("*.toml"))
    assert len(files) >= 8
    for f in files:
        s = scenario.load(f)
        assert s.device_count > 0, f


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioInvalid) as info:
        scenario.load(tmp_path / "nope.toml")
    assert "cannot read" in str(info.value)
