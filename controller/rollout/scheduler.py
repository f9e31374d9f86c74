"""The rollout scheduler: loads counts, calls the pure planner, persists, then acts.

Rules (restart safety, design "the scheduler persists every decision"):

* One transaction per rollout per tick holds: the planner's decisions (``decisions`` rows), the
  group/rollout state changes, and for every device commanded the bump of its per-device
  ``command_counter``, its ``commands`` outbox row (the exact signed bytes) and its
  ``rollout_devices`` row moving SCHEDULED -> COMMANDED. Nothing is published inside it.
* After commit, the outbox is published and rows are stamped ``published_at``. A crash before
  commit loses the whole round (the next tick plans it again from the same state); a crash after
  commit republishes the same bytes with the same counter (QoS1 is at-least-once anyway; the
  agent drops a counter it has seen). So no device ever gets two install commands for one
  rollout, and a group starts only after a committed ``FinishGroup`` of the one before.
* On PostgreSQL the rollout row is locked ``FOR UPDATE SKIP LOCKED`` for the round, so replicas
  never plan the same rollout at once.

Device reports are applied by ``controller/reports.py`` (drained before every tick).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from controller.db import models as m
from controller.errors import (
    Conflict,
    ControllerError,
    InvalidInput,
    NotFound,
    RequirementsUnmet,
    RolloutError,
)
from controller.ids import check_bundle_id, check_device_id, check_id
from controller.rollout import planner as p
from controller.rollout.states import DS
from controller.rollout.targeting import split_phases, unmet, window_open

if TYPE_CHECKING:
    from controller.service import ControllerService, Principal

log = logging.getLogger(__name__)


_DEFAULT_PHASES = (1, 10, 50, 100)
MAX_GROUPS = 20


@dataclass(frozen=True)
class PhaseSpec:
    """One phase as asked for at creation: a cumulative percentage and its gate."""

    name: str
    percent: int
    gate: p.Gate


def gate_to_json(g: p.Gate) -> dict[str, Any]:
    """Persisted form of a gate."""
    return {
        "min_successes": g.min_successes,
        "threshold_pct": g.threshold_pct,
        "max_failure_pct": g.max_failure_pct,
        "soak_seconds": g.soak_seconds,
        "health_tolerance_pct": g.health_tolerance_pct,
        "error_action": g.error_action.value,
    }


def gate_from_json(d: Mapping[str, Any]) -> p.Gate:
    """Inverse of ``gate_to_json``; raises ValueError on out-of-range values."""
    return p.Gate(
        min_successes=int(d.get("min_successes", 1)),
        threshold_pct=int(d.get("threshold_pct", 100)),
        max_failure_pct=int(d.get("max_failure_pct", 0)),
        soak_seconds=int(d.get("soak_seconds", 0)),
        health_tolerance_pct=(
            None if d.get("health_tolerance_pct") is None else int(d["health_tolerance_pct"])
        ),
        error_action=p.ErrorAction(d.get("error_action", "pause")),
    )


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Scheduler:
    """Rollout creation, steering, the tick, and device reports (see module docstring)."""

    def __init__(self, svc: ControllerService) -> None:
        self.svc = svc

    # ------------------------------------------------------------------ creation

    def create(
        self,
        actor: Principal,
        *,
        name: str,
        release_id: str,
        hardware_models: Sequence[str] = (),
        tags: Sequence[str] = (),
        sites: Sequence[str] = (),
        trial_devices: Sequence[str] = (),
        trial_tag: str | None = None,
        trial_gate: p.Gate | None = None,
        phases: Sequence[PhaseSpec] = (),
        max_in_flight: int = 100,
        max_in_flight_per_site: int | None = None,
        after_rollout: int | None = None,
        prepare_now: bool = True,
        health_metric: str | None = None,
    ) -> dict[str, Any]:
        """Create a rollout with its groups and device assignments.

        With ``prepare_now`` the delta payloads are made before returning and the rollout is
        READY; without (the HTTP API), it is CREATING and the next ``tick`` makes them and moves
        it to READY, so an API call never waits minutes for a large image's deltas.

        Targets the active devices whose hardware model the release supports (and, when given,
        in ``hardware_models``, carrying every tag of ``tags``, at one of ``sites``), minus
        those already running the release's target image. Devices whose component versions do
        not meet the release's ``requires`` are left out; if that leaves none, the rollout is
        refused. A requirement met by the release of an unfinished rollout ``after_rollout``
        (or found automatically) orders this rollout after that one.

        Raises:
            NotFound: unknown release.
            InvalidInput: bad names, phases or limits.
            RequirementsUnmet: no targeted device meets the requirements.
            RolloutError: no device to update.
        """
        check_id(name, "rollout name")
        check_bundle_id(release_id)
        health_metric = check_id(health_metric or self.svc.config.health_metric, "health metric")
        for x in (*hardware_models, *tags, *sites):
            check_id(x, "target filter")
        for trial_id in trial_devices:
            check_device_id(trial_id)
        if not 1 <= max_in_flight <= 100_000:
            raise InvalidInput("max_in_flight must be within 1..100000")
        if max_in_flight_per_site is not None and not 1 <= max_in_flight_per_site <= 100_000:
            raise InvalidInput("max_in_flight_per_site must be within 1..100000")
        phases = list(phases) or [
            PhaseSpec(f"{pct}pct", pct, p.Gate(min_successes=1, max_failure_pct=10))
            for pct in _DEFAULT_PHASES
        ]
        if len(phases) > MAX_GROUPS:
            raise InvalidInput(f"at most {MAX_GROUPS} phases")
        for ph in phases:
            check_id(ph.name, "phase name")
        now = self.svc.clock()
        with self.svc.sessions.begin() as s:
            rel = s.get(m.Release, release_id)
            if rel is None:
                raise NotFound(f"release {release_id!r} does not exist")
            q = select(m.Device).where(
                m.Device.status == "active",
                m.Device.hardware_model.in_(rel.hardware_models),
            )
            if hardware_models:
                q = q.where(m.Device.hardware_model.in_(list(hardware_models)))
            if sites:
                q = q.where(m.Device.site.in_(list(sites)))
            candidates = [
                d
                for d in s.scalars(q)
                if all(t in d.tags for t in tags) and d.active_digest != rel.target_sha256
            ]
            if not candidates:
                raise RolloutError(
                    "no active device matches the target (model, tags, sites) and still needs "
                    f"release {release_id!r}",
                    code="rollout.empty_target",
                )
            after_rollout, pending = self._requirement_sources(s, rel, after_rollout)
            eligible: list[tuple[m.Device, list[str]]] = []
            refused: list[tuple[m.Device, list[str]]] = []
            for d in candidates:
                versions = {**d.versions, **pending}
                missing = unmet(versions, rel.requires)
                (refused if missing else eligible).append((d, missing))
            if not eligible:
                sample = "; ".join(f"{d.id}: needs {', '.join(x)}" for d, x in refused[:5])
                raise RequirementsUnmet(
                    f"no targeted device meets the requirements of {release_id!r} "
                    f"({len(refused)} devices refused: {sample})"
                )
            trial_ids = {d.id for d, _ in eligible if d.id in set(trial_devices)} | {
                d.id for d, _ in eligible if trial_tag is not None and trial_tag in d.tags
            }
            rest = [d.id for d, _ in eligible if d.id not in trial_ids]
            try:
                split = split_phases(rest, [ph.percent for ph in phases], key=f"{name}:{now}")
            except ValueError as e:
                raise InvalidInput(str(e)) from e
            ro = m.Rollout(
                name=name,
                release_id=release_id,
                state=(p.RolloutState.READY if prepare_now else p.RolloutState.CREATING).value,
                target={
                    "hardware_models": list(hardware_models),
                    "tags": list(tags),
                    "sites": list(sites),
                    "trial_devices": list(trial_devices),
                    "trial_tag": trial_tag,
                    "health_metric": health_metric,
                },
                max_in_flight=max_in_flight,
                max_in_flight_per_site=max_in_flight_per_site,
                after_rollout=after_rollout,
                reason="",
                created_at=_utc(now),
                created_by=actor.name,
            )
            s.add(ro)
            s.flush()
            groups: list[tuple[str, p.Gate, list[str]]] = []
            if trial_ids:
                groups.append(("trial", trial_gate or p.Gate(min_successes=1), sorted(trial_ids)))
            groups += [(ph.name, ph.gate, ids) for ph, ids in zip(phases, split, strict=True)]
            site_of = {d.id: d.site for d, _ in eligible}
            for i, (gname, gate, ids) in enumerate(groups):
                g = m.RolloutGroup(
                    rollout_id=ro.id,
                    index=i,
                    name=gname,
                    state=p.GroupState.SCHEDULED.value,
                    total=len(ids),
                    gate=gate_to_json(gate),
                    failures_acknowledged=0,
                    reason="",
                )
                s.add(g)
                s.flush()
                s.add_all(
                    m.RolloutDevice(
                        rollout_id=ro.id,
                        device_id=d,
                        group_id=g.id,
                        state=DS.SCHEDULED.value,
                        site=site_of[d],
                        phase="",
                        progress=0,
                        error="",
                        updated_at=now,
                    )
                    for d in ids
                )
            self._decide(
                s,
                ro.id,
                now,
                actor.name,
                "create",
                devices=len(eligible),
                refused_requirements=len(refused),
                after_rollout=after_rollout,
            )
            self.svc.audit(s, actor, "rollout.create", str(ro.id), name=name, release=release_id)
            rollout_id = ro.id
        if prepare_now:
            self.svc.releases.prepare_payloads(rollout_id)
        return self.status(rollout_id)

    def prepare_created(self, now: float) -> list[dict[str, Any]]:
        """Make the payloads of CREATING rollouts and move them to READY."""
        with self.svc.sessions() as s:
            ids = list(s.scalars(select(m.Rollout.id).where(m.Rollout.state == "creating")))
        out = []
        for rid in ids:
            made = self.svc.releases.prepare_payloads(rid)
            with self.svc.sessions.begin() as s:
                ro = self._load(s, rid)
                if ro.state != "creating":
                    continue
                ro.state = p.RolloutState.READY.value
                self._decide(s, rid, now, "scheduler", "Prepared", deltas=made)
            out.append({"rollout": rid, "action": "Prepared", "deltas": made})
        return out

    def _requirement_sources(
        self, s: Session, rel: m.Release, after: int | None
    ) -> tuple[int | None, dict[str, str]]:
        """Versions promised by an unfinished rollout of a required component (ordering)."""
        if after is not None:
            prior = s.get(m.Rollout, after)
            if prior is None:
                raise NotFound(f"rollout {after} does not exist")
            prel = s.get(m.Release, prior.release_id)
            assert prel is not None
            return after, {prel.component: prel.version}
        for component, spec in sorted(rel.requires.items()):
            q = (
                select(m.Rollout, m.Release)
                .join(m.Release, m.Release.bundle_id == m.Rollout.release_id)
                .where(
                    m.Release.component == component,
                    m.Rollout.state.in_(["creating", "ready", "running", "paused"]),
                )
                .order_by(m.Rollout.id.desc())
            )
            for ro, prel in s.execute(q).all():
                if not unmet({component: prel.version}, {component: spec}):
                    return ro.id, {component: prel.version}
        return None, {}

    # ------------------------------------------------------------------ operator actions

    def _load(self, s: Session, rollout_id: int, lock: bool = True) -> m.Rollout:
        q = select(m.Rollout).where(m.Rollout.id == rollout_id)
        if lock and s.bind is not None and s.bind.dialect.name == "postgresql":
            q = q.with_for_update()
        ro = s.scalar(q)
        if ro is None:
            raise NotFound(f"rollout {rollout_id} does not exist")
        return ro

    def _transition(
        self, actor: Principal, rollout_id: int, allowed: set[str], to: str, verb: str
    ) -> dict[str, Any]:
        now = self.svc.clock()
        with self.svc.sessions.begin() as s:
            ro = self._load(s, rollout_id)
            if ro.state not in allowed:
                raise Conflict(f"cannot {verb} rollout {rollout_id} in state {ro.state}")
            if verb == "resume":
                # The operator accepts the failures seen so far and re-arms failed groups.
                for g in s.scalars(
                    select(m.RolloutGroup).where(m.RolloutGroup.rollout_id == rollout_id)
                ):
                    if g.state == p.GroupState.ERROR.value:
                        g.state = p.GroupState.RUNNING.value
                    failed = s.scalar(
                        select(func.count())
                        .select_from(m.RolloutDevice)
                        .where(
                            m.RolloutDevice.group_id == g.id,
                            m.RolloutDevice.state == DS.FAILED.value,
                        )
                    )
                    g.failures_acknowledged = int(failed or 0)
            ro.state = to
            done = {"start": "started", "pause": "paused", "resume": "resumed"}[verb]
            ro.reason = f"{done} by {actor.name}"
            self._decide(s, rollout_id, now, actor.name, verb)
            self.svc.audit(s, actor, f"rollout.{verb}", str(rollout_id))
        return self.status(rollout_id)

    def start(self, actor: Principal, rollout_id: int) -> dict[str, Any]:
        """READY -> RUNNING (the next tick starts the first group)."""
        return self._transition(actor, rollout_id, {"ready"}, "running", "start")

    def pause(self, actor: Principal, rollout_id: int) -> dict[str, Any]:
        """RUNNING -> PAUSED: no new group, no new command; devices in flight carry on."""
        return self._transition(actor, rollout_id, {"running"}, "paused", "pause")

    def resume(self, actor: Principal, rollout_id: int) -> dict[str, Any]:
        """PAUSED -> RUNNING, accepting the failures seen so far."""
        return self._transition(actor, rollout_id, {"paused"}, "running", "resume")

    def abort(self, actor: Principal, rollout_id: int) -> dict[str, Any]:
        """Stop for good; devices commanded but not done get a cancel command."""
        return self._stop(actor, rollout_id, rollback=False)

    def rollback(self, actor: Principal, rollout_id: int) -> dict[str, Any]:
        """Stop, and flip every device that took the update back to its previous slot.

        The rollback command carries no payload: the agent boots the other slot again, which
        still holds the image it came from. Devices in flight get a cancel.
        """
        return self._stop(actor, rollout_id, rollback=True)

    def _stop(self, actor: Principal, rollout_id: int, *, rollback: bool) -> dict[str, Any]:
        verb = "rollback" if rollback else "abort"
        now = self.svc.clock()
        with self.svc.sessions.begin() as s:
            ro = self._load(s, rollout_id)
            ok = {"creating", "ready", "running", "paused"} | (
                {"stopped", "finished"} if rollback else set()
            )
            if ro.state not in ok:
                raise Conflict(f"cannot {verb} rollout {rollout_id} in state {ro.state}")
            ro.state = p.RolloutState.STOPPED.value
            ro.reason = f"{'rolled back' if rollback else 'aborted'} by {actor.name}"
            rows = s.scalars(
                select(m.RolloutDevice).where(
                    m.RolloutDevice.rollout_id == rollout_id,
                    m.RolloutDevice.state.in_(
                        [DS.COMMANDED.value] + ([DS.SUCCEEDED.value] if rollback else [])
                    ),
                )
            ).all()
            sent = 0
            for rd in rows:
                if rd.state == DS.COMMANDED.value:
                    action, rd.state = "cancel", DS.CANCEL_SENT.value
                else:
                    action, rd.state = "rollback", DS.ROLLBACK_SENT.value
                rd.counter = self._command(
                    s,
                    device_id=rd.device_id,
                    action=action,
                    args={"rollout": str(rollout_id)},
                    rollout_id=rollout_id,
                    now=now,
                )
                rd.updated_at = now
                sent += 1
            self._decide(s, rollout_id, now, actor.name, verb, commands=sent)
            self.svc.audit(s, actor, f"rollout.{verb}", str(rollout_id), commands=sent)
        self.publish_pending()
        return self.status(rollout_id)

    # ------------------------------------------------------------------ reading

    def list_rollouts(self) -> list[dict[str, Any]]:
        """Every rollout, newest first, without groups."""
        with self.svc.sessions() as s:
            rows = s.scalars(select(m.Rollout).order_by(m.Rollout.id.desc())).all()
            return [
                {
                    "id": r.id,
                    "name": r.name,
                    "release": r.release_id,
                    "state": r.state,
                    "reason": r.reason,
                }
                for r in rows
            ]

    def status(self, rollout_id: int) -> dict[str, Any]:
        """A rollout with its groups, their counts and gates, and the last decisions."""
        with self.svc.sessions() as s:
            ro = s.get(m.Rollout, rollout_id)
            if ro is None:
                raise NotFound(f"rollout {rollout_id} does not exist")
            counts = self._state_counts(s, rollout_id)
            errors: dict[int, dict[str, int]] = defaultdict(dict)
            eq = (
                select(m.RolloutDevice.group_id, m.RolloutDevice.error, func.count())
                .where(
                    m.RolloutDevice.rollout_id == rollout_id,
                    m.RolloutDevice.state == DS.FAILED.value,
                )
                .group_by(m.RolloutDevice.group_id, m.RolloutDevice.error)
            )
            for gid, code, n in s.execute(eq).all():
                errors[gid][code or "unknown"] = n
            groups = []
            for g in s.scalars(
                select(m.RolloutGroup)
                .where(m.RolloutGroup.rollout_id == rollout_id)
                .order_by(m.RolloutGroup.index)
            ):
                groups.append(  # noqa: PERF401 (a dict literal per group reads better)
                    {
                        "id": g.id,
                        "index": g.index,
                        "name": g.name,
                        "state": g.state,
                        "total": g.total,
                        "gate": g.gate,
                        "gate_met_at": g.gate_met_at,
                        "reason": g.reason,
                        "errors": dict(errors.get(g.id, {})),
                        "counts": dict(counts.get(g.id, {})),
                    }
                )
            decisions = [
                {"at": d.at, "actor": d.actor, "action": d.action, "detail": d.detail}
                for d in s.scalars(
                    select(m.Decision)
                    .where(m.Decision.rollout_id == rollout_id)
                    .order_by(m.Decision.id.desc())
                    .limit(20)
                )
            ]
            return {
                "id": ro.id,
                "name": ro.name,
                "release": ro.release_id,
                "state": ro.state,
                "reason": ro.reason,
                "target": ro.target,
                "max_in_flight": ro.max_in_flight,
                "max_in_flight_per_site": ro.max_in_flight_per_site,
                "after_rollout": ro.after_rollout,
                "groups": groups,
                "decisions": decisions,
            }

    @staticmethod
    def _state_counts(s: Session, rollout_id: int) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = defaultdict(dict)
        q = (
            select(m.RolloutDevice.group_id, m.RolloutDevice.state, func.count())
            .where(m.RolloutDevice.rollout_id == rollout_id)
            .group_by(m.RolloutDevice.group_id, m.RolloutDevice.state)
        )
        for gid, state, n in s.execute(q).all():
            out[gid][state] = n
        return out

    # ------------------------------------------------------------------ the tick

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """One round: for every RUNNING rollout, plan and apply; then publish the outbox.

        Returns:
            The decisions taken, one dict per action (for logs and tests).
        """
        now = self.svc.clock() if now is None else now
        self.svc.reports.drain()
        taken: list[dict[str, Any]] = self.prepare_created(now)
        with self.svc.sessions() as s:
            ids = list(s.scalars(select(m.Rollout.id).where(m.Rollout.state == "running")))
        for rid in ids:
            try:
                taken += self._tick_one(rid, now)
            except ControllerError as e:
                # The round was rolled back; a rollout that cannot go on (no command key, ...)
                # pauses with the reason instead of failing every round unseen.
                taken.append(self._pause_for(rid, now, f"{e.code}: {e}"))
            except Exception:
                log.exception("scheduler round of rollout %s failed; retrying next round", rid)
        self.publish_pending()
        return taken

    def _pause_for(self, rollout_id: int, now: float, reason: str) -> dict[str, Any]:
        with self.svc.sessions.begin() as s:
            ro = self._load(s, rollout_id)
            if ro.state == "running":
                ro.state, ro.reason = "paused", reason
                self._decide(s, rollout_id, now, "scheduler", "PauseRollout", reason=reason)
        return {"rollout": rollout_id, "action": "PauseRollout", "reason": reason}

    def _tick_one(self, rollout_id: int, now: float) -> list[dict[str, Any]]:
        with self.svc.sessions.begin() as s:
            q = select(m.Rollout).where(m.Rollout.id == rollout_id)
            if s.bind is not None and s.bind.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            ro = s.scalar(q)
            if ro is None or ro.state != "running":
                return []
            if ro.after_rollout is not None:
                prior = s.get(m.Rollout, ro.after_rollout)
                if prior is not None and prior.state == "stopped":
                    reason = f"rollout {prior.id} it waits for was stopped: {prior.reason}"
                    ro.state, ro.reason = "paused", reason
                    self._decide(s, ro.id, now, "scheduler", "PauseRollout", reason=reason)
                    return [{"rollout": ro.id, "action": "PauseRollout", "reason": reason}]
                if prior is not None and prior.state != "finished":
                    return []  # design 6: order multi-component rollouts
            groups = list(
                s.scalars(
                    select(m.RolloutGroup)
                    .where(m.RolloutGroup.rollout_id == rollout_id)
                    .order_by(m.RolloutGroup.index)
                )
            )
            view = p.RolloutView(
                id=ro.id,
                state=p.RolloutState(ro.state),
                max_in_flight=ro.max_in_flight,
                groups=tuple(
                    p.GroupView(
                        id=g.id,
                        index=g.index,
                        name=g.name,
                        state=p.GroupState(g.state),
                        gate=gate_from_json(g.gate),
                        total=g.total,
                        gate_met_at=g.gate_met_at,
                        failures_acknowledged=g.failures_acknowledged,
                    )
                    for g in groups
                ),
            )
            self._reissue_expired(s, ro, now)
            counts = self._counts(s, ro, groups)
            actions = p.plan(view, counts, now)
            by_id = {g.id: g for g in groups}
            return [self._apply(s, ro, by_id, a, now) for a in actions]

    def _counts(
        self, s: Session, ro: m.Rollout, groups: list[m.RolloutGroup]
    ) -> dict[int, p.Counts]:
        raw = self._state_counts(s, ro.id)
        current = next((g for g in groups if g.state == "running"), None)
        health_upd = health_base = None
        if current is not None and gate_from_json(current.gate).health_tolerance_pct is not None:
            metric = ro.target.get("health_metric") or self.svc.config.health_metric
            health_upd, health_base = self._health(s, ro.id, current.id, metric)
        out = {}
        for g in groups:
            c = raw.get(g.id, {})
            out[g.id] = p.Counts(
                scheduled=c.get(DS.SCHEDULED.value, 0),
                in_flight=c.get(DS.COMMANDED.value, 0),
                succeeded=c.get(DS.SUCCEEDED.value, 0),
                failed=c.get(DS.FAILED.value, 0),
                health_updated=health_upd if current is g else None,
                health_baseline=health_base if current is g else None,
            )
        return out

    def _health(
        self, s: Session, rollout_id: int, group_id: int, metric: str
    ) -> tuple[float | None, ...]:
        q = (
            select(m.RolloutDevice.group_id, m.RolloutDevice.state, m.Device.health)
            .join(m.Device, m.Device.id == m.RolloutDevice.device_id)
            .where(
                m.RolloutDevice.rollout_id == rollout_id,
                m.RolloutDevice.state.in_([DS.SUCCEEDED.value, DS.SCHEDULED.value]),
            )
        )
        upd: list[float] = []
        base: list[float] = []
        for gid, state, health in s.execute(q).all():
            v = (health or {}).get(metric)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            if state == DS.SUCCEEDED.value and gid == group_id:
                upd.append(float(v))
            elif state == DS.SCHEDULED.value:
                base.append(float(v))
        return (
            sum(upd) / len(upd) if upd else None,
            sum(base) / len(base) if base else None,
        )

    def _apply(
        self,
        s: Session,
        ro: m.Rollout,
        groups: dict[int, m.RolloutGroup],
        a: p.RolloutAction,
        now: float,
    ) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        match a:
            case p.StartGroup(group_id=gid):
                groups[gid].state, groups[gid].started_at = "running", now
                detail = {"group": groups[gid].name}
            case p.CommandDevices(group_id=gid, count=n):
                sent = self._command_group(s, ro, groups[gid], n, now)
                detail = {"group": groups[gid].name, "asked": n, "commanded": sent}
            case p.MarkGateMet(group_id=gid, at=at):
                groups[gid].gate_met_at = at
                detail = {"group": groups[gid].name}
            case p.ClearGateMet(group_id=gid):
                groups[gid].gate_met_at = None
                detail = {"group": groups[gid].name}
            case p.FinishGroup(group_id=gid):
                groups[gid].state, groups[gid].finished_at = "finished", now
                detail = {"group": groups[gid].name}
            case p.FailGroup(group_id=gid, reason=reason):
                groups[gid].state, groups[gid].reason = "error", reason
                detail = {"group": groups[gid].name, "reason": reason}
            case p.PauseRollout(reason=reason):
                ro.state, ro.reason = "paused", reason
                detail = {"reason": reason}
            case p.StopRollout(reason=reason):
                ro.state, ro.reason = "stopped", reason
                detail = {"reason": reason}
            case p.FinishRollout():
                ro.state, ro.reason = "finished", "every group finished"
        name = type(a).__name__
        if not (isinstance(a, p.CommandDevices) and detail.get("commanded") == 0):
            self._decide(s, ro.id, now, "planner", name, **detail)
        return {"rollout": ro.id, "action": name, **detail}

    def _command_group(
        self, s: Session, ro: m.Rollout, g: m.RolloutGroup, n: int, now: float
    ) -> int:
        """Command up to ``n`` scheduled devices of ``g`` whose site window is open now.

        Batched: one query loads the candidates with their devices' counters and digests (rows
        locked on PostgreSQL), commands are signed in memory, then one executemany each bumps
        the counters, inserts the outbox rows and moves the rollout rows.
        """
        sites = {x.name: x for x in s.scalars(select(m.Site))}
        per_site: dict[str, int] = defaultdict(int)
        if ro.max_in_flight_per_site is not None:
            q = (
                select(m.RolloutDevice.site, func.count())
                .where(
                    m.RolloutDevice.rollout_id == ro.id, m.RolloutDevice.state == DS.COMMANDED.value
                )
                .group_by(m.RolloutDevice.site)
            )
            per_site.update(dict(s.execute(q).tuples().all()))
        open_sites: dict[str, bool] = {}
        cq = (
            select(
                m.RolloutDevice.device_id,
                m.RolloutDevice.site,
                m.Device.command_counter,
                m.Device.active_digest,
            )
            .join(m.Device, m.Device.id == m.RolloutDevice.device_id)
            .where(m.RolloutDevice.group_id == g.id, m.RolloutDevice.state == DS.SCHEDULED.value)
            .order_by(m.RolloutDevice.device_id)
        )
        if s.bind is not None and s.bind.dialect.name == "postgresql":
            cq = cq.with_for_update(of=m.Device)
        release = s.get(m.Release, ro.release_id)
        assert release is not None
        plan = self.svc.releases.install_plan(s, release, ro.id)
        cap = ro.max_in_flight_per_site
        commanded: list[dict[str, Any]] = []
        unfit: list[dict[str, Any]] = []
        outbox: list[dict[str, Any]] = []
        counters: list[dict[str, Any]] = []
        for device_id, site, last, digest in s.execute(cq):
            if len(commanded) >= n:
                break
            if site not in open_sites:
                row = sites.get(site)
                open_sites[site] = row is None or window_open(row.windows, row.tz, now)
            if not open_sites[site] or (cap is not None and per_site[site] >= cap):
                continue
            chosen = plan.args_for(device_id, digest)
            key = {"rollout_id": ro.id, "device_id": device_id}
            if chosen is None:
                unfit.append(
                    {
                        **key,
                        "state": DS.FAILED.value,
                        "error": "controller.no_payload",
                        "updated_at": now,
                    }
                )
                continue
            args, payload_id = chosen
            counter = self._queue_install(
                device_id, int(last), args,
                rollout_id=ro.id, now=now, counters=counters, outbox=outbox,
            )
            commanded.append(
                {
                    **key,
                    "state": DS.COMMANDED.value,
                    "counter": counter,
                    "payload_id": payload_id,
                    "updated_at": now,
                }
            )
            per_site[site] += 1
        if counters:
            s.execute(update(m.Device), counters)
            s.execute(insert(m.Command), outbox)
        # executemany by primary key; the two lists have different columns.
        for rows in (commanded, unfit):
            if rows:
                s.execute(update(m.RolloutDevice), rows)
        return len(commanded)

    def _reissue_expired(self, s: Session, ro: m.Rollout, now: float) -> None:
        """Re-command devices whose install command expired with no report since.

        The agent refuses an expired command, so the old one can never run; the new one has
        the next counter (a replay of the old one stays refused). Recorded as a decision.
        """
        ttl = self.svc.config.command_ttl_seconds
        q = (
            select(m.RolloutDevice.device_id, m.Device.command_counter, m.Device.active_digest)
            .join(m.Device, m.Device.id == m.RolloutDevice.device_id)
            .where(
                m.RolloutDevice.rollout_id == ro.id,
                m.RolloutDevice.state == DS.COMMANDED.value,
                m.RolloutDevice.updated_at <= now - ttl,
            )
            .limit(ro.max_in_flight)
        )
        rows = s.execute(q).all()
        if not rows:
            return
        release = s.get(m.Release, ro.release_id)
        assert release is not None
        plan = self.svc.releases.install_plan(s, release, ro.id)
        counters: list[dict[str, Any]] = []
        outbox: list[dict[str, Any]] = []
        moved: list[dict[str, Any]] = []
        for device_id, last, digest in rows:
            chosen = plan.args_for(device_id, digest)
            if chosen is None:
                continue
            args, payload_id = chosen
            counter = self._queue_install(
                device_id, int(last), args,
                rollout_id=ro.id, now=now, counters=counters, outbox=outbox,
            )
            moved.append(
                {
                    "rollout_id": ro.id,
                    "device_id": device_id,
                    "counter": counter,
                    "payload_id": payload_id,
                    "updated_at": now,
                }
            )
        if counters:
            s.execute(update(m.Device), counters)
            s.execute(insert(m.Command), outbox)
            s.execute(update(m.RolloutDevice), moved)
            self._decide(s, ro.id, now, "scheduler", "ReissueExpired", devices=len(counters))

    def _queue_install(
        self,
        device_id: str,
        last_counter: int,
        args: dict[str, Any],
        *,
        rollout_id: int,
        now: float,
        counters: list[dict[str, Any]],
        outbox: list[dict[str, Any]],
    ) -> int:
        # One place numbers and signs an install, so first issue and re-issue cannot drift apart
        # on the counter rule (strictly +1, written in the same transaction as the outbox row).
        counter = last_counter + 1
        body = self._sign(device_id, counter, "install", args, now)
        counters.append({"id": device_id, "command_counter": counter})
        outbox.append(
            {
                "device_id": device_id,
                "counter": counter,
                "action": "install",
                "rollout_id": rollout_id,
                "body": body,
                "created_at": now,
            }
        )
        return counter

    def _sign(
        self, device_id: str, counter: int, action: str, args: dict[str, Any], now: float
    ) -> bytes:
        return self.svc.releases.sign_command(
            {
                "type": "command",
                "schema": 1,
                "device": device_id,
                "counter": counter,
                "issued": int(now),
                "expires": int(now) + self.svc.config.command_ttl_seconds,
                "action": action,
                "args": args,
            }
        )

    def _command(
        self,
        s: Session,
        *,
        device_id: str,
        action: str,
        args: dict[str, Any],
        rollout_id: int,
        now: float,
    ) -> int:
        """Write one signed command to the outbox with the device's next counter."""
        counter = s.execute(
            update(m.Device)
            .where(m.Device.id == device_id)
            .values(command_counter=m.Device.command_counter + 1)
            .returning(m.Device.command_counter)
        ).scalar_one()
        body = self._sign(device_id, counter, action, args, now)
        s.add(
            m.Command(
                device_id=device_id,
                counter=counter,
                action=action,
                rollout_id=rollout_id,
                body=body,
                created_at=now,
            )
        )
        return int(counter)

    @staticmethod
    def _decide(
        s: Session, rollout_id: int, now: float, actor: str, action: str, **detail: Any
    ) -> None:
        s.add(m.Decision(rollout_id=rollout_id, at=now, actor=actor, action=action, detail=detail))

    def publish_pending(self, batch: int = 2000) -> int:
        """Hand unpublished outbox commands to the gateway, oldest first; stamp them."""
        gw = self.svc.gateway
        if gw is None:
            return 0
        total = 0
        for _ in range(10_000):
            with self.svc.sessions() as s:
                rows = s.execute(
                    select(m.Command.id, m.Command.device_id, m.Command.body)
                    .where(m.Command.published_at.is_(None))
                    .order_by(m.Command.id)
                    .limit(batch)
                ).all()
            if not rows:
                break
            for _cid, device_id, body in rows:
                gw.publish_command(device_id, bytes(body))
            with self.svc.sessions.begin() as s:
                s.execute(
                    update(m.Command)
                    .where(m.Command.id.in_([r[0] for r in rows]))
                    .values(published_at=self.svc.clock())
                )
            total += len(rows)
        return total


def _utc(ts: float) -> Any:
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.fromtimestamp(ts, dt.UTC)
