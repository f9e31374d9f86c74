"""Health metrics: the pure computation, real probes (files, processes), the sampler loop,
``[health]`` config, and the runtime carrying health and versions into what it publishes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from pathlib import Path

import pytest
from agent_device import Device, derived, image, make_bundle
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runtime_transport import OLD, LinkTransport, _agent

from agent.adapters.bootenv import DEFAULT_ENV, RedundantEnv
from agent.cli import _build
from agent.cli import agent as agent_cli
from agent.config import load_config, parse_config
from agent.core.states import AgentState, BootSlot, SlotInfo
from agent.errors import ConfigInvalid
from agent.health import (
    FAILURES,
    CheckFailures,
    CheckLatency,
    CommandMetric,
    ErrorCount,
    FunctionSource,
    HealthSampler,
    StaticMetrics,
    is_error_event,
    merge,
    normalise,
    parse_number,
    sampler_from_config,
)
from agent.runtime import state_document
from agent.selftest import Check

SAMPLE = Path(__file__).parents[2] / "packaging" / "agent" / "agent.toml"


def run(coro):
    return asyncio.run(coro)


# -- pure computation -------------------------------------------------------------------------


def test_parse_number_takes_the_first_word() -> None:
    assert parse_number("3\n") == 3
    assert parse_number("  12.5 ms\n") == 12.5
    assert parse_number("7.0") == 7
    assert isinstance(parse_number("7.0"), int)
    for bad in ("", "   \n", "n/a", "nan", "inf", "-inf"):
        with pytest.raises(ValueError):
            parse_number(bad)


def test_normalise_refuses_bools_and_non_finite() -> None:
    assert normalise(2.0) == 2
    assert isinstance(normalise(2.0), int)
    assert normalise(0.25) == 0.25
    with pytest.raises(TypeError):
        normalise(True)
    with pytest.raises(TypeError):
        normalise("1")
    with pytest.raises(ValueError):
        normalise(float("nan"))


def test_merge_adds_same_names_and_drops_garbage() -> None:
    got = merge(
        [
            {"errors": 1, "latency_ms": 12},
            {"errors": 2.0, "Bad-Name": 1, "flag": True, "nan": float("nan"), "s": "3"},
        ]
    )
    assert got == {"errors": 3, "latency_ms": 12}
    assert isinstance(got["errors"], int)


def test_merge_never_overflows_to_infinity() -> None:
    assert merge([{"x": 1e308}, {"x": 1e308}]) == {"x": 1e308}
    assert merge([{"x": 10**400}, {"y": 1.0}]) == {"y": 1}
    assert merge([{"x": 2**63}, {"x": 1}]) == {"x": 2**63}


def test_merge_keeps_at_most_limit_names_deterministically() -> None:
    many = {f"m{i:02d}": i for i in range(40)}
    got = merge([many])
    assert len(got) == 32
    assert list(got) == sorted(many)[:32]
    assert merge([many], limit=2) == {"m00": 0, "m01": 1}


def test_error_events_are_errors_and_successes_are_not() -> None:
    assert is_error_event({"type": "error", "code": "transfer.error"})
    for outcome in ("failed", "reverted", "rejected"):
        assert is_error_event({"type": "result", "outcome": outcome})
    assert not is_error_event({"type": "result", "outcome": "committed"})
    assert not is_error_event({"type": "result", "outcome": "rolled_back"})
    assert not is_error_event({"type": "phase", "phase": "downloading"})


def test_error_count_counts_only_errors() -> None:
    c = ErrorCount()
    for e in ({"type": "phase"}, {"type": "error"}, {"type": "result", "outcome": "reverted"}):
        c.note(e)
    assert run(c.sample()) == {"errors": 2}


# -- probes against real files and processes ---------------------------------------------------


def test_check_failures_rerun_real_checks(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    ok.write_text("")
    checks = [Check("file", path=str(ok)), Check("file", path=str(tmp_path / "missing"))]
    src = CheckFailures("app_failures", checks)
    assert run(src.sample()) == {"app_failures": 1}
    ok.unlink()
    assert run(src.sample()) == {"app_failures": 2}


def test_check_latency_measures_the_checks() -> None:
    src = CheckLatency("check_ms", [Check("command", argv=("sleep", "0.1"))])
    ms = run(src.sample())["check_ms"]
    assert 90 <= ms < 3000


def test_hanging_check_counts_as_failed_at_its_timeout() -> None:
    t = time.monotonic()
    src = CheckFailures("f", [Check("command", argv=("sleep", "30"), timeout=0.2)])
    assert run(src.sample()) == {"f": 1}
    assert time.monotonic() - t < 3


def test_command_metric_reads_stdout() -> None:
    assert run(CommandMetric("restarts", ["sh", "-c", "echo 4"]).sample()) == {"restarts": 4}


def test_command_metric_failures_raise() -> None:
    with pytest.raises(RuntimeError, match="exited 2"):
        run(CommandMetric("x", ["sh", "-c", "echo 1; exit 2"]).sample())
    with pytest.raises(ValueError):
        run(CommandMetric("x", ["echo", "unknown"]).sample())
    with pytest.raises(RuntimeError):
        run(CommandMetric("x", ["/nonexistent/probe"]).sample())
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish"):
        run(CommandMetric("x", ["sh", "-c", "sleep 30 & sleep 30"], timeout=0.2).sample())
    assert time.monotonic() - t < 3


def test_chatty_command_does_not_block() -> None:
    argv = ["sh", "-c", "echo 5; head -c 1000000 /dev/zero"]
    assert run(CommandMetric("x", argv, timeout=5).sample()) == {"x": 5}


# -- the sampler ------------------------------------------------------------------------------


def test_sampler_merges_sources_and_counts_broken_ones() -> None:
    def broken() -> dict[str, int]:
        raise OSError("probe gone")

    async def slow() -> dict[str, int]:
        await asyncio.sleep(5)
        return {"never": 1}

    s = HealthSampler(
        [StaticMetrics({"errors": 5}), FunctionSource(broken), FunctionSource(slow)],
        source_timeout=0.1,
    )
    s.note_event({"type": "error", "code": "transfer.error"})
    assert run(s.sample()) == {"errors": 6, FAILURES: 2}
    assert s.last == {"errors": 6, FAILURES: 2}


def test_sampler_loop_sleeps_between_samples_and_never_dies_on_publish() -> None:
    slept: list[float] = []
    seen: list[dict] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    async def publish(values: dict) -> None:
        seen.append(values)
        raise RuntimeError("broker gone")

    s = HealthSampler([], interval=60)
    with pytest.raises(asyncio.CancelledError):
        run(s.run(publish, sleep))
    assert slept == [60, 60, 60]
    assert seen == [{"errors": 0}] * 3


def test_interval_zero_samples_once() -> None:
    seen: list[dict] = []

    async def publish(values: dict) -> None:
        seen.append(values)

    run(HealthSampler([], interval=0).run(publish))
    assert seen == [{"errors": 0}]


def test_interval_below_a_second_is_refused() -> None:
    with pytest.raises(ValueError):
        HealthSampler([], interval=0.01)


# -- config -----------------------------------------------------------------------------------


def _uncommented_health(text: str) -> str:
    """The sample's commented ``[health]`` block, switched on."""
    start = text.index("# [health]\n")
    block = text[start:]
    return text[:start] + re.sub(r"^# ?", "", block, flags=re.MULTILINE)


def test_sample_config_has_no_health_until_uncommented(tmp_path: Path) -> None:
    assert load_config(SAMPLE).health is None
    path = tmp_path / "agent.toml"
    path.write_text(_uncommented_health(SAMPLE.read_text()))
    cfg = load_config(path)
    assert cfg.health is not None
    assert cfg.health.interval == 60
    assert [(m.name, m.kind) for m in cfg.health.metrics] == [
        ("app_failures", "checks"),
        ("app_check_ms", "latency"),
        ("app_restarts", "command"),
    ]
    sampler = sampler_from_config(cfg.health, cfg.checks)
    assert len(sampler.sources) == 4  # errors + the three metrics


BASE = {
    "device": {"id": "d"},
    "trust": {"root": "t"},
    "slots": {"a": "x", "b": "y"},
    "bootenv": {"config": "c"},
}


def _cfg(health: dict, checks: list | None = None):
    doc = {**BASE, "health": health}
    if checks is not None:
        doc["selftest"] = {"check": checks}
    return parse_config(doc)


def test_health_config_is_checked() -> None:
    assert _cfg({}).health.interval == 60
    assert _cfg({"interval": 0}).health.interval == 0
    bad = [
        {"interval": 0.5},
        {"surprise": 1},
        {"errors": "yes"},
        {"metric": [{"name": "x", "kind": "gauge"}]},
        {"metric": [{"name": "Bad Name", "kind": "command", "argv": ["true"]}]},
        {"metric": [{"name": "x", "kind": "command"}]},
        {"metric": [{"name": "x", "kind": "checks", "checks": ["nope"]}]},
        {"metric": [{"name": "x", "kind": "checks"}]},
        {"metric": [{"name": "x", "kind": "command", "argv": ["true"], "timeout": 0}]},
        {"metric": [{"name": "x", "kind": "command", "argv": ["true"]}] * 2},
    ]
    for h in bad:
        with pytest.raises(ConfigInvalid):
            _cfg(h)
    cfg = _cfg(
        {"errors": False, "metric": [{"name": "f", "kind": "checks", "checks": ["app"]}]},
        [{"kind": "file", "name": "app", "path": "/nonexistent/ok"}],
    )
    sampler = sampler_from_config(cfg.health, cfg.checks)
    assert run(sampler.sample()) == {"f": 1}  # errors switched off, the file is missing


# -- the runtime ------------------------------------------------------------------------------


class HealthDevice(Device):
    """The agent test device with a health sampler; ``degraded`` versions add errors."""

    degraded: dict[str, int]
    versions: dict[str, str]

    def agent(self, slot, sources, behaviour):
        a = super().agent(slot, sources, behaviour)
        sha, _ = self.identify(slot)
        extra = self.degraded.get(self.versions.get(sha or "", ""), 0)
        a.health = HealthSampler([StaticMetrics({"errors": extra})], interval=0)
        return a


def _device(degraded: dict[str, int]) -> tuple[HealthDevice, object]:
    factory = image(1)
    dev = HealthDevice(factory)
    bundle = make_bundle(derived(factory, 7), version="2.0")
    dev.learn(bundle.image, "good")
    dev.degraded = degraded
    dev.versions = {
        hashlib.sha256(factory).hexdigest(): "1.0",
        hashlib.sha256(bundle.image).hexdigest(): "2.0",
    }
    return dev, bundle


def test_committed_result_carries_the_new_versions_health() -> None:
    dev, bundle = _device({"2.0": 5})
    assert dev.run(bundle) == "settled"
    agent = dev.last_agent
    assert agent is not None
    results = [e for e in agent.events if e.get("type") == "result"]
    assert results[-1]["outcome"] == "committed"
    assert results[-1]["health"] == {"errors": 5}
    doc = agent.status()
    assert doc["health"] == {"errors": 5}
    assert doc["versions"] == {"rootfs": "2.0"}
    assert doc["slots"][doc["primary"]]["sha256"] == bundle.release.target_sha256
    assert doc["last_result"]["outcome"] == "committed"


def test_revert_counts_as_an_error() -> None:
    dev, bundle = _device({})
    dev.learn(bundle.image, "fails")
    assert dev.run(bundle) == "settled"
    agent = dev.last_agent
    assert agent is not None
    assert agent.status()["last_result"]["outcome"] == "reverted"
    assert agent.health is not None
    assert agent.health.errors.count >= 1
    assert run(agent.health.sample())["errors"] >= 1


def test_state_document_without_a_sampler_has_no_health() -> None:
    dev, _ = _device({})
    assert dev.run(None) == "settled"
    agent = dev.last_agent
    assert agent is not None
    doc = state_document(agent.state, "dev-1", BootSlot.A)
    assert "health" not in doc
    assert doc["versions"] == {"rootfs": "1.0"}


def test_run_publishes_health_first_then_only_when_it_changes() -> None:
    values = iter([1, 1, 2, 2, 2, 2])
    taken: list[int] = []

    def source() -> dict[str, int]:
        taken.append(next(values))
        return {"app_restarts": taken[-1]}

    async def main() -> LinkTransport:
        dev = Device(OLD)
        link = LinkTransport({})
        agent = _agent(dev, BootSlot.A, link)
        agent.health = HealthSampler([FunctionSource(source)], interval=1)
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(2.5)
        agent.stop()
        assert await task == "stopped"
        return link

    link = run(main())
    assert len(taken) == 3  # at start, after 1 s, after 2 s: the loop sleeps in between
    # reconciling publishes before the first sample (no health: the controller keeps the last
    # it had); run() samples before its own first publish; then only a change republishes
    assert "health" not in link.states[0]
    assert link.states[1]["health"] == {"errors": 0, "app_restarts": 1}
    assert [s.get("health", {}).get("app_restarts") for s in link.states] == [None, 1, 2]


def test_sample_first_false_waits_an_interval() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        raise asyncio.CancelledError

    async def publish(values: dict) -> None:
        raise AssertionError("sampled before the first interval")

    with pytest.raises(asyncio.CancelledError):
        run(HealthSampler([], interval=5).run(publish, sleep, sample_first=False))
    assert slept == [5]
    run(HealthSampler([], interval=0).run(publish, sample_first=False))  # returns at once


def test_agent_built_from_config_samples_its_health_metrics(tmp_path: Path) -> None:
    size = 64 * 1024
    (tmp_path / "a.img").write_bytes(image(3, size))
    (tmp_path / "trust.json").write_text("{}")  # read at start-up, verified on the first command
    RedundantEnv(str(tmp_path / "env")).write(dict(DEFAULT_ENV))
    (tmp_path / "ok").write_text("")
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(f"""
[device]
id = "dev-h"
factory_version = "1.0"
factory_size = {size}
component = "app"
[trust]
root = "{tmp_path / "trust.json"}"
[slots]
kind = "file"
a = "{tmp_path / "a.img"}"
b = "{tmp_path / "b.img"}"
size = {size}
booted = "a"
[bootenv]
kind = "file"
path = "{tmp_path / "env"}"
[journal]
path = "{tmp_path / "journal.json"}"
[[selftest.check]]
kind = "file"
name = "ok"
path = "{tmp_path / "ok"}"
[health]
interval = 0
[[health.metric]]
name = "ok_failures"
kind = "checks"
checks = ["ok"]
[[health.metric]]
name = "answer"
kind = "command"
argv = ["echo", "42"]
""")

    async def main():
        a = _build(load_config(cfg_path))
        await a.start()
        try:
            assert a.health is not None
            first = await a.health.sample()
            (tmp_path / "ok").unlink()
            second = await a.health.sample()
            return a.status(), first, second
        finally:
            a.close()

    status, first, second = run(main())
    assert first == {"answer": 42, "errors": 0, "ok_failures": 0}
    assert second == {"answer": 42, "errors": 0, "ok_failures": 1}
    assert status["versions"] == {"app": "1.0"}
    assert status["health"] == second
    r = CliRunner().invoke(agent_cli, ["status", "--json", "--config", str(cfg_path)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["versions"] == {"app": "1.0"}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.one_of(st.sampled_from(["errors", "lat_ms", "x"]), st.text(max_size=70)),
            st.one_of(
                st.integers(-(2**70), 2**70),
                st.floats(allow_nan=True, allow_infinity=True),
                st.booleans(),
                st.text(max_size=3),
                st.none(),
            ),
            max_size=40,
        ),
        max_size=4,
    )
)
def test_merge_always_yields_a_document_the_controller_accepts(samples) -> None:
    got = merge(samples)
    assert len(got) <= 32
    assert list(got) == sorted(got)
    for name, value in got.items():
        assert re.match(r"^[a-z][a-z0-9_]{0,63}$", name)
        assert not isinstance(value, bool)
        assert isinstance(value, int | float)
        assert math.isfinite(value)
        assert math.isfinite(float(value))  # what the controller does with it
    assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_unknown_version_is_left_out_of_versions() -> None:
    doc = state_document(AgentState.initial(BootSlot.B, SlotInfo()), "dev-1", BootSlot.A)
    assert "versions" not in doc
    assert doc["version"] is None
