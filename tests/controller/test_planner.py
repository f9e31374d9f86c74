"""plan(): unit cases named after failures, and a hypothesis state machine over random rollouts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controller.rollout import planner as p


def view(state=p.RolloutState.RUNNING, groups=(), max_in_flight=10):
    return p.RolloutView(id=1, state=state, groups=tuple(groups), max_in_flight=max_in_flight)


def group(i, state=p.GroupState.SCHEDULED, total=10, gate=None, met=None, ack=0):
    return p.GroupView(
        id=i,
        index=i,
        name=f"g{i}",
        state=state,
        gate=gate or p.Gate(),
        total=total,
        gate_met_at=met,
        failures_acknowledged=ack,
    )


def test_paused_rollout_starts_no_group_and_commands_nobody():
    for state in set(p.RolloutState) - {p.RolloutState.RUNNING}:
        v = view(state, [group(1), group(2, p.GroupState.RUNNING)])
        assert p.plan(v, {2: p.Counts(scheduled=5)}, 0) == []


def test_second_group_not_started_before_first_gate_soaked():
    gate = p.Gate(min_successes=1, soak_seconds=600)
    v = view(groups=[group(1, p.GroupState.RUNNING, 2, gate, met=1000.0), group(2)])
    counts = {1: p.Counts(succeeded=2)}
    assert p.plan(v, counts, 1599) == []
    assert p.plan(v, counts, 1600) == [p.FinishGroup(1)]


def test_failures_over_threshold_pause_with_reason():
    gate = p.Gate(max_failure_pct=20)
    v = view(groups=[group(1, p.GroupState.RUNNING, 10, gate)])
    actions = p.plan(v, {1: p.Counts(in_flight=5, failed=3, succeeded=2)}, 0)
    assert isinstance(actions[0], p.FailGroup)
    assert isinstance(actions[1], p.PauseRollout)
    assert "3 of 10 devices failed" in actions[1].reason


def test_abort_action_stops_instead_of_pausing():
    gate = p.Gate(max_failure_pct=0, error_action=p.ErrorAction.ABORT)
    v = view(groups=[group(1, p.GroupState.RUNNING, 10, gate)])
    actions = p.plan(v, {1: p.Counts(failed=1, in_flight=9)}, 0)
    assert isinstance(actions[-1], p.StopRollout)


def test_acknowledged_failures_do_not_fail_the_group_again():
    gate = p.Gate(max_failure_pct=0)
    v = view(groups=[group(1, p.GroupState.RUNNING, 10, gate, ack=1)])
    assert p.plan(v, {1: p.Counts(failed=1, in_flight=9)}, 0) == []


def test_worse_health_than_devices_left_behind_fails_the_gate():
    gate = p.Gate(min_successes=2, health_tolerance_pct=10)
    v = view(groups=[group(1, p.GroupState.RUNNING, 4, gate)])
    ok = p.Counts(succeeded=2, in_flight=2, health_updated=1.1, health_baseline=1.0)
    bad = p.Counts(succeeded=2, in_flight=2, health_updated=1.2, health_baseline=1.0)
    assert not any(isinstance(a, p.FailGroup) for a in p.plan(v, {1: ok}, 0))
    assert "health of updated devices" in p.plan(v, {1: bad}, 0)[0].reason


def test_concurrency_limit_counts_devices_of_every_group():
    v = view(
        groups=[group(1, p.GroupState.FINISHED), group(2, p.GroupState.RUNNING)], max_in_flight=5
    )
    actions = p.plan(v, {1: p.Counts(in_flight=3, succeeded=7), 2: p.Counts(scheduled=10)}, 0)
    assert actions == [p.CommandDevices(2, 2)]


def test_group_with_devices_left_uncommanded_never_passes():
    # A closed maintenance window left devices scheduled: the gate must wait for them.
    gate = p.Gate(min_successes=1, threshold_pct=50)
    v = view(groups=[group(1, p.GroupState.RUNNING, 4, gate)], max_in_flight=1)
    actions = p.plan(v, {1: p.Counts(scheduled=1, in_flight=1, succeeded=2)}, 0)
    assert not any(isinstance(a, p.MarkGateMet) for a in actions)


def test_empty_group_finishes():
    v = view(groups=[group(1, p.GroupState.RUNNING, 0)])
    assert p.plan(v, {}, 5) == [p.MarkGateMet(1, 5)]


def test_all_finished_finishes_rollout():
    v = view(groups=[group(1, p.GroupState.FINISHED)])
    assert p.plan(v, {}, 0) == [p.FinishRollout()]


@pytest.mark.parametrize("bad", [-1, 101, 1000])
def test_thresholds_outside_0_100_are_refused(bad):
    with pytest.raises(ValueError):
        p.Gate(threshold_pct=bad)
    with pytest.raises(ValueError):
        p.Gate(max_failure_pct=bad)


# --------------------------------------------------------------------------- state machine

gates = st.builds(
    p.Gate,
    min_successes=st.integers(0, 6),
    threshold_pct=st.integers(0, 100),
    max_failure_pct=st.integers(0, 100),
    soak_seconds=st.sampled_from([0, 10, 100]),
    health_tolerance_pct=st.none() | st.integers(0, 50),
    error_action=st.sampled_from(p.ErrorAction),
)


class RolloutWorld(RuleBasedStateMachine):
    """A rollout driven only by plan(), with devices finishing at random."""

    @initialize(
        specs=st.lists(st.tuples(st.integers(0, 8), gates), min_size=1, max_size=4),
        max_in_flight=st.integers(1, 6),
    )
    def setup(self, specs, max_in_flight):
        self.now = 0.0
        self.state = p.RolloutState.RUNNING
        self.max_in_flight = max_in_flight
        self.groups = {
            i: {
                "view": group(i, total=total, gate=gate),
                "scheduled": total,
                "in_flight": 0,
                "succeeded": 0,
                "failed": 0,
                "health": None,
            }
            for i, (total, gate) in enumerate(specs, start=1)
        }
        self.baseline = 1.0

    def _counts(self):
        out = {}
        for gid, g in self.groups.items():
            out[gid] = p.Counts(
                g["scheduled"],
                g["in_flight"],
                g["succeeded"],
                g["failed"],
                g["health"],
                self.baseline if g["scheduled"] else None,
            )
        return out

    def _view(self):
        return view(self.state, [g["view"] for g in self.groups.values()], self.max_in_flight)

    @rule()
    def tick(self):
        counts = self._counts()
        actions = p.plan(self._view(), counts, self.now)
        if self.state is not p.RolloutState.RUNNING:
            assert actions == [], "a rollout that is not running gets no decisions"
            return
        ordered = list(self.groups)
        for a in actions:
            match a:
                case p.StartGroup(group_id=gid):
                    before = ordered[: ordered.index(gid)]
                    assert all(
                        self.groups[b]["view"].state is p.GroupState.FINISHED for b in before
                    ), "group started before an earlier one finished"
                    self._set(gid, state=p.GroupState.RUNNING)
                case p.CommandDevices(group_id=gid, count=n):
                    g = self.groups[gid]
                    assert g["view"].state is p.GroupState.RUNNING
                    assert 0 < n <= g["scheduled"]
                    g["scheduled"] -= n
                    g["in_flight"] += n
                case p.MarkGateMet(group_id=gid, at=at):
                    self._set(gid, gate_met_at=at)
                case p.ClearGateMet(group_id=gid):
                    self._set(gid, gate_met_at=None)
                case p.FinishGroup(group_id=gid):
                    g = self.groups[gid]
                    v = g["view"]
                    assert v.gate_met_at is not None
                    assert self.now - v.gate_met_at >= v.gate.soak_seconds, "soak cut short"
                    assert g["scheduled"] == 0
                    assert g["succeeded"] >= min(v.gate.min_successes, v.total)
                    done = g["succeeded"] + g["failed"]
                    assert done * 100 >= v.gate.threshold_pct * v.total
                    failed = g["failed"] - v.failures_acknowledged
                    assert failed * 100 <= v.gate.max_failure_pct * v.total
                    self._set(gid, state=p.GroupState.FINISHED)
                case p.FailGroup(group_id=gid):
                    self._set(gid, state=p.GroupState.ERROR)
                case p.PauseRollout():
                    self.state = p.RolloutState.PAUSED
                case p.StopRollout():
                    self.state = p.RolloutState.STOPPED
                case p.FinishRollout():
                    assert all(
                        g["view"].state is p.GroupState.FINISHED for g in self.groups.values()
                    )
                    self.state = p.RolloutState.FINISHED

    def _set(self, gid, **changes):
        self.groups[gid]["view"] = replace(self.groups[gid]["view"], **changes)

    @rule(data=st.data(), success=st.booleans(), health=st.floats(0.5, 2.0))
    def device_finishes(self, data, success, health):
        busy = [gid for gid, g in self.groups.items() if g["in_flight"]]
        if not busy:
            return
        g = self.groups[data.draw(st.sampled_from(busy))]
        g["in_flight"] -= 1
        g["succeeded" if success else "failed"] += 1
        if success:
            g["health"] = health

    @rule(seconds=st.sampled_from([1, 10, 100]))
    def time_passes(self, seconds):
        self.now += seconds

    @precondition(lambda self: self.state is p.RolloutState.RUNNING)
    @rule()
    def operator_pauses(self):
        self.state = p.RolloutState.PAUSED

    @precondition(lambda self: self.state is p.RolloutState.PAUSED)
    @rule()
    def operator_resumes(self):
        # What the service does on resume: accept failures so far, re-arm groups in error.
        for gid, g in self.groups.items():
            state = g["view"].state
            self._set(
                gid,
                failures_acknowledged=g["failed"],
                state=p.GroupState.RUNNING if state is p.GroupState.ERROR else state,
            )
        self.state = p.RolloutState.RUNNING

    @invariant()
    def in_flight_bounded(self):
        if hasattr(self, "groups"):
            assert sum(g["in_flight"] for g in self.groups.values()) <= self.max_in_flight

    @invariant()
    def never_more_commanded_than_devices(self):
        if hasattr(self, "groups"):
            for g in self.groups.values():
                assert g["scheduled"] >= 0
                used = g["in_flight"] + g["succeeded"] + g["failed"]
                assert used + g["scheduled"] == g["view"].total


TestRolloutWorld = RolloutWorld.TestCase
TestRolloutWorld.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
