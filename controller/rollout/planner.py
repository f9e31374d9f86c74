"""The rollout planner: state in, decisions out. Pure: no I/O, no clock, no database.

Vocabulary after hawkBit: a rollout is CREATING -> READY -> RUNNING <-> PAUSED -> STOPPED |
FINISHED; its groups (phases: trial group, 1 %, 10 %, ...) are SCHEDULED -> RUNNING -> FINISHED,
or ERROR when a gate fails.

Rules ``plan()`` enforces (tests/controller/test_planner.py checks each):

* Only a RUNNING rollout gets decisions. A PAUSED (or any other) rollout starts no group and
  commands no device.
* Groups run in index order. A group starts only once every group before it is FINISHED, and a
  group finishes only when its gate has held for its whole soak time.
* The gate of a group: at least ``min_successes`` devices succeeded (capped at the group size, so
  an empty group can finish), at least ``threshold_pct`` % of the group is done (succeeded or
  failed) and every device of it was commanded, and, when a health tolerance is set and there
  are devices not yet updated, the mean
  health metric of the updated devices (lower is better) is at most ``tolerance_pct`` % worse
  than that of the devices left behind. The soak clock starts when the gate first holds and
  restarts if it stops holding.
* More than ``max_failure_pct`` % of the group failed (failures acknowledged by an operator's
  resume excluded), or health worse than allowed, fails the group (ERROR) and pauses or stops the
  rollout with the reason as one human line.
* At most ``max_in_flight`` devices of the rollout are commanded and not yet done at any time.

Example::

    actions = plan(view, {g.id: counts_of(g) for g in view.groups}, now=1_700_000_000)
    # [CommandDevices(group_id=1, count=5)]
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class RolloutState(enum.Enum):
    """Lifecycle of a rollout (hawkBit ``Rollout.RolloutStatus``)."""

    CREATING = "creating"
    READY = "ready"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FINISHED = "finished"


class GroupState(enum.Enum):
    """Lifecycle of a rollout group (hawkBit ``RolloutGroup.RolloutGroupStatus``)."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    FINISHED = "finished"
    ERROR = "error"


class ErrorAction(enum.Enum):
    """What a failing gate does to the rollout."""

    PAUSE = "pause"
    ABORT = "abort"


def _pct(value: int, name: str) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"{name} must be within 0..100, got {value}")


@dataclass(frozen=True)
class Gate:
    """The conditions a group must meet before the next group may start."""

    min_successes: int = 1
    threshold_pct: int = 100
    max_failure_pct: int = 0
    soak_seconds: int = 0
    health_tolerance_pct: int | None = None
    error_action: ErrorAction = ErrorAction.PAUSE

    def __post_init__(self) -> None:
        _pct(self.threshold_pct, "threshold_pct")
        _pct(self.max_failure_pct, "max_failure_pct")
        if self.health_tolerance_pct is not None and not 0 <= self.health_tolerance_pct <= 1000:
            raise ValueError("health_tolerance_pct must be within 0..1000")
        if self.min_successes < 0 or self.soak_seconds < 0:
            raise ValueError("min_successes and soak_seconds must not be negative")


@dataclass(frozen=True)
class GroupView:
    """What the planner knows of one group."""

    id: int
    index: int
    name: str
    state: GroupState
    gate: Gate
    total: int
    gate_met_at: float | None = None
    failures_acknowledged: int = 0


@dataclass(frozen=True)
class RolloutView:
    """What the planner knows of one rollout; groups in index order."""

    id: int
    state: RolloutState
    groups: tuple[GroupView, ...]
    max_in_flight: int

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if [g.index for g in self.groups] != sorted(g.index for g in self.groups):
            raise ValueError("groups must be in index order")


@dataclass(frozen=True)
class Counts:
    """Device counts of one group, and the health means the gate compares."""

    scheduled: int = 0
    in_flight: int = 0
    succeeded: int = 0
    failed: int = 0
    health_updated: float | None = None
    health_baseline: float | None = None

    @property
    def done(self) -> int:
        """Devices with a final result."""
        return self.succeeded + self.failed


@dataclass(frozen=True)
class StartGroup:
    """Move a SCHEDULED group to RUNNING."""

    group_id: int


@dataclass(frozen=True)
class CommandDevices:
    """Command up to ``count`` more scheduled devices of a running group."""

    group_id: int
    count: int


@dataclass(frozen=True)
class MarkGateMet:
    """The gate holds from ``at`` on: the soak clock starts."""

    group_id: int
    at: float


@dataclass(frozen=True)
class ClearGateMet:
    """The gate stopped holding: the soak clock restarts when it holds again."""

    group_id: int


@dataclass(frozen=True)
class FinishGroup:
    """The gate held for the soak time: the group is FINISHED."""

    group_id: int


@dataclass(frozen=True)
class FailGroup:
    """The gate failed: the group is in ERROR, with the reason."""

    group_id: int
    reason: str


@dataclass(frozen=True)
class PauseRollout:
    """Pause the rollout (no new groups, no new commands), with the reason."""

    reason: str


@dataclass(frozen=True)
class StopRollout:
    """Stop the rollout for good, with the reason."""

    reason: str


@dataclass(frozen=True)
class FinishRollout:
    """Every group finished."""


RolloutAction = (
    StartGroup
    | CommandDevices
    | MarkGateMet
    | ClearGateMet
    | FinishGroup
    | FailGroup
    | PauseRollout
    | StopRollout
    | FinishRollout
)


def _failure(group: GroupView, counts: Counts) -> str | None:
    failed = max(0, counts.failed - group.failures_acknowledged)
    if group.total and failed * 100 > group.gate.max_failure_pct * group.total:
        return (
            f"group {group.name!r}: {failed} of {group.total} devices failed "
            f"(more than {group.gate.max_failure_pct}%)"
        )
    tol = group.gate.health_tolerance_pct
    upd, base = counts.health_updated, counts.health_baseline
    need = min(group.gate.min_successes, group.total)
    if (
        tol is not None
        and upd is not None
        and base is not None
        and counts.succeeded >= max(need, 1)
        and upd * 100 > base * (100 + tol) + 1e-9
    ):
        return (
            f"group {group.name!r}: health of updated devices {upd:.3g} is worse than "
            f"{base:.3g} of devices not yet updated (tolerance {tol}%)"
        )
    return None


def _gate_holds(group: GroupView, counts: Counts) -> bool:
    # Every device of the group must have been commanded: a device left behind by a closed
    # maintenance window would otherwise never be updated once the next group starts.
    need = min(group.gate.min_successes, group.total)
    return (
        counts.scheduled == 0
        and counts.succeeded >= need
        and counts.done * 100 >= group.gate.threshold_pct * group.total
    )


def plan(
    rollout: RolloutView, group_counts: Mapping[int, Counts], now: float
) -> list[RolloutAction]:
    """Decide what the scheduler does next for one rollout.

    Args:
        rollout: the rollout and its groups as persisted.
        group_counts: device counts per group id (a missing group counts as empty).
        now: wall-clock seconds (soak times).

    Returns:
        The decisions, in the order they are to be applied.
    """
    if rollout.state is not RolloutState.RUNNING:
        return []
    counts = {g.id: group_counts.get(g.id, Counts()) for g in rollout.groups}
    in_flight = sum(c.in_flight for c in counts.values())
    current = next((g for g in rollout.groups if g.state is not GroupState.FINISHED), None)
    if current is None:
        return [FinishRollout()]
    c = counts[current.id]
    if current.state is GroupState.SCHEDULED:
        return [StartGroup(current.id)]
    if current.state is GroupState.ERROR:
        # A RUNNING rollout with a group in ERROR: the pause/stop decision was lost or the
        # rollout was resumed without re-arming the group; pause again rather than go on.
        return [PauseRollout(f"group {current.name!r} is in error")]
    reason = _failure(current, c)
    if reason is not None:
        end: RolloutAction = (
            StopRollout(reason)
            if current.gate.error_action is ErrorAction.ABORT
            else PauseRollout(reason)
        )
        return [FailGroup(current.id, reason), end]
    actions: list[RolloutAction] = []
    budget = rollout.max_in_flight - in_flight
    if c.scheduled > 0 and budget > 0:
        actions.append(CommandDevices(current.id, min(c.scheduled, budget)))
    if _gate_holds(current, c):
        if current.gate_met_at is None:
            actions.append(MarkGateMet(current.id, now))
        elif now - current.gate_met_at >= current.gate.soak_seconds:
            actions.append(FinishGroup(current.id))
    elif current.gate_met_at is not None:
        actions.append(ClearGateMet(current.id))
    return actions
