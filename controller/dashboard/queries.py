"""The dashboard's read model: the SQL behind each page. Read-only.

Rules:

* Nothing here writes. Rollout status and release documents come from the service
  (``Scheduler.status``, ``ReleaseStore.list_releases``); the rest are aggregate queries the
  service has no use for.
* Counts are ``GROUP BY`` queries and lists are ``LIMIT``-ed or paged in SQL, so a page costs the
  same with ten devices or ten thousand (tests/controller/test_dashboard.py measures it).
* A device's *update state* is the state of its row in the newest rollout that includes it
  (highest rollout id): ``updating`` while a command is in flight there, ``failed`` when that
  row failed. *Connectivity* is the presence flag of an active device; decommissioned devices
  are counted apart and left out of the other counts.
* The *version* a device runs is the release whose signed target digest equals the device's
  reported active-slot digest (agents report digests, not version strings); an image no release
  targets is shown by its digest.

    q = DashboardQueries(svc)
    q.devices(DeviceFilter(site="berlin", state=DeviceState.FAILED), page=1)
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, and_, func, select
from sqlalchemy.orm import Session

from controller.db import models as m
from controller.errors import InvalidInput
from controller.ids import check_device_id, check_id
from controller.rollout.states import DS

if TYPE_CHECKING:
    from controller.service import ControllerService, Principal

PER_PAGE = 50
MAX_PAGE = 100_000
IN_FLIGHT = (DS.COMMANDED.value, DS.CANCEL_SENT.value, DS.ROLLBACK_SENT.value)
OPEN_ROLLOUTS = ("creating", "ready", "running", "paused")
_DIGEST = re.compile(r"[0-9a-f]{64}")
NO_IMAGE = "none"  # filter value: devices that reported no active digest yet


class DeviceState(enum.Enum):
    """What the device list filters on (see module docstring)."""

    ONLINE = "online"
    OFFLINE = "offline"
    UPDATING = "updating"
    FAILED = "failed"
    DECOMMISSIONED = "decommissioned"


@dataclass(frozen=True)
class Image:
    """An active-slot image: its digest and the release(s) that target it."""

    digest: str | None
    releases: tuple[str, ...] = ()  # "component version" of releases targeting it, sorted
    base_of: tuple[str, ...] = ()  # the same, of releases with a delta from it

    @property
    def label(self) -> str:
        """How the dashboard names the image."""
        if self.digest is None:
            return "not reported"
        if self.releases:
            return ", ".join(self.releases)
        if self.base_of:
            # An image no uploaded release targets, but a delta starts from: the version
            # before those releases (e.g. the factory image).
            return f"{self.digest[:12]} (delta base of {', '.join(self.base_of)})"
        return f"unknown image {self.digest[:12]}"

    @property
    def filter_value(self) -> str:
        """The ``image`` filter value that selects the devices running it."""
        return self.digest or NO_IMAGE


@dataclass(frozen=True)
class DeviceFilter:
    """Device list filters; every value is validated like the API validates it."""

    site: str | None = None
    model: str | None = None
    state: DeviceState | None = None
    image: str | None = None

    def __post_init__(self) -> None:
        if self.site is not None:
            check_id(self.site, "site")
        if self.model is not None:
            check_id(self.model, "hardware model")
        if self.image is not None and self.image != NO_IMAGE and not _DIGEST.fullmatch(self.image):
            raise InvalidInput("image must be a sha256 hex digest or 'none'")

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> DeviceFilter:
        """From query parameters (empty values mean "any")."""

        def get(k: str) -> str | None:
            return query.get(k) or None

        state = get("state")
        try:
            parsed = DeviceState(state) if state else None
        except ValueError:
            raise InvalidInput(f"unknown device state {state!r:.40}") from None
        return cls(site=get("site"), model=get("model"), state=parsed, image=get("image"))


@dataclass(frozen=True)
class LastRollout:
    """A device's row in one rollout."""

    rollout_id: int
    state: str
    phase: str = ""
    progress: int = 0
    error: str = ""
    updated_at: float = 0.0
    rollout_name: str = ""


@dataclass(frozen=True)
class DeviceRow:
    """One line of the device list."""

    id: str
    site: str
    model: str
    status: str
    online: bool
    last_seen: dt.datetime | None
    phase: str
    image: Image
    last: LastRollout | None


@dataclass(frozen=True)
class DevicePage:
    """One page of the device list."""

    rows: tuple[DeviceRow, ...]
    total: int
    page: int
    per_page: int = PER_PAGE

    @property
    def pages(self) -> int:
        """Number of pages (at least 1)."""
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class RolloutRow:
    """A rollout with its device counts by rollout-device state."""

    id: int
    name: str
    release: str
    release_label: str
    state: str
    reason: str
    created_at: dt.datetime
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Devices in the rollout."""
        return sum(self.counts.values())


@dataclass(frozen=True)
class Overview:
    """The fleet at a glance."""

    devices: int
    decommissioned: int
    by_state: tuple[tuple[DeviceState, int], ...]
    by_site: tuple[tuple[str, int], ...]
    by_model: tuple[tuple[str, int], ...]
    by_image: tuple[tuple[Image, int], ...]
    by_phase: tuple[tuple[str, int], ...]
    open_rollouts: tuple[RolloutRow, ...]


@dataclass(frozen=True)
class GateCheck:
    """One condition of a group's gate, with the value it has now."""

    name: str
    value: str
    limit: str
    ok: bool | None  # None: not applicable yet


@dataclass(frozen=True)
class GroupDetail:
    """A rollout group as the scheduler reports it, plus its gate evaluated for display."""

    doc: Mapping[str, Any]
    checks: tuple[GateCheck, ...]
    started_at: float | None
    finished_at: float | None
    failures_acknowledged: int


@dataclass(frozen=True)
class Decision:
    """One row of a rollout's decision log."""

    at: float
    actor: str
    action: str
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class RolloutDevice:
    """A device's row in a rollout, for the attention lists."""

    device_id: str
    site: str
    state: str
    phase: str
    progress: int
    error: str
    updated_at: float


@dataclass(frozen=True)
class RolloutDetail:
    """Everything the rollout page shows."""

    status: Mapping[str, Any]
    release_label: str
    groups: tuple[GroupDetail, ...]
    decisions: tuple[Decision, ...]
    failed: tuple[RolloutDevice, ...]
    in_flight: tuple[RolloutDevice, ...]


@dataclass(frozen=True)
class TimelineEntry:
    """One line of a device's recent history."""

    at: float
    kind: str
    text: str
    rollout_id: int | None = None


@dataclass(frozen=True)
class DeviceDetail:
    """Everything the device page shows."""

    doc: Mapping[str, Any]
    image: Image
    rollouts: tuple[LastRollout, ...]
    last_result: LastRollout | None
    timeline: tuple[TimelineEntry, ...]


@dataclass(frozen=True)
class ReleaseRow:
    """A release with the number of devices running its target and its rollouts."""

    doc: Mapping[str, Any]
    running: int
    rollouts: int


def gate_checks(
    gate: Mapping[str, Any],
    counts: Mapping[str, int],
    *,
    total: int,
    acknowledged: int,
    gate_met_at: float | None,
    now: float,
    started: bool = True,
) -> tuple[GateCheck, ...]:
    """The gate's conditions with their current values (mirrors ``planner._gate_holds``).

    For display only: the planner decides; this says how far each condition is from holding.
    """
    succeeded = counts.get(DS.SUCCEEDED.value, 0)
    failed = counts.get(DS.FAILED.value, 0)
    scheduled = counts.get(DS.SCHEDULED.value, 0)
    done = succeeded + failed
    need = min(int(gate.get("min_successes", 1)), total)
    threshold = int(gate.get("threshold_pct", 100))
    max_fail = int(gate.get("max_failure_pct", 0))
    counted = max(0, failed - acknowledged)
    soak = int(gate.get("soak_seconds", 0))
    checks = [
        GateCheck("successes", str(succeeded), f">= {need}", succeeded >= need),
        GateCheck(
            "done",
            f"{_pct(done, total)} ({done}/{total})",
            f">= {threshold}%",
            done * 100 >= threshold * total,
        ),
        GateCheck("all commanded", f"{scheduled} waiting", "0 waiting", scheduled == 0),
        GateCheck(
            "failures",
            f"{_pct(counted, total)} ({counted}/{total}"
            + (f", {acknowledged} acknowledged" if acknowledged else "")
            + ")",
            f"<= {max_fail}%",
            not (total and counted * 100 > max_fail * total),
        ),
    ]
    soaked = None if gate_met_at is None else max(0.0, now - gate_met_at)
    checks.append(
        GateCheck(
            "soak",
            "gate not met yet" if soaked is None else f"{int(soaked)} s since gate met",
            f">= {soak} s",
            None if soaked is None else soaked >= soak,
        )
    )
    tol = gate.get("health_tolerance_pct")
    if tol is not None:
        checks.append(GateCheck("health", "compared by the planner", f"<= +{tol}%", None))
    if not started:
        # A group not started yet is not failing its gate: every condition is still to come.
        return tuple(GateCheck(c.name, c.value, c.limit, None) for c in checks)
    return tuple(checks)


def _pct(n: int, total: int) -> str:
    return f"{(100 * n / total) if total else 0:.0f}%"


def _latest_rows() -> Any:
    """Each device's row in the newest rollout that includes it (a subquery)."""
    rd = m.RolloutDevice
    newest = (
        select(rd.device_id.label("device_id"), func.max(rd.rollout_id).label("rid"))
        .group_by(rd.device_id)
        .subquery()
    )
    return (
        select(rd.device_id, rd.state)
        .join(newest, and_(rd.device_id == newest.c.device_id, rd.rollout_id == newest.c.rid))
        .subquery()
    )


class DashboardQueries:
    """See module docstring; one per app, sessions per call."""

    def __init__(self, svc: ControllerService) -> None:
        self.svc = svc

    # ------------------------------------------------------------------ images

    @staticmethod
    def _images(s: Session, digests: Iterable[str | None]) -> dict[str | None, Image]:
        wanted = sorted({d for d in digests if d})
        names: dict[str, set[str]] = defaultdict(set)
        bases: dict[str, set[str]] = defaultdict(set)
        rel = m.Release
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            q = select(rel.target_sha256, rel.component, rel.version).where(
                rel.target_sha256.in_(part)
            )
            for digest, component, version in s.execute(q).all():
                names[digest].add(f"{component} {version}")
            bq = (
                select(m.Payload.base_sha256, rel.component, rel.version)
                .join(rel, rel.bundle_id == m.Payload.release_id)
                .where(m.Payload.base_sha256.in_(part))
            )
            for base, component, version in s.execute(bq).all():
                bases[str(base)].add(f"{component} {version}")
        out: dict[str | None, Image] = {None: Image(None)}
        for d in wanted:
            out[d] = Image(d, tuple(sorted(names.get(d, ()))), tuple(sorted(bases.get(d, ()))))
        return out

    # ------------------------------------------------------------------ overview

    def overview(self) -> Overview:
        """Fleet counts and the rollouts not yet finished or stopped."""
        d = m.Device
        active = d.status == "active"
        with self.svc.sessions() as s:
            by_status = dict(s.execute(select(d.status, func.count()).group_by(d.status)).all())
            online = dict(
                s.execute(select(d.online, func.count()).where(active).group_by(d.online)).all()
            )
            latest = _latest_rows()
            update_q = (
                select(latest.c.state, func.count())
                .join(d, d.id == latest.c.device_id)
                .where(active)
                .group_by(latest.c.state)
            )
            updates: dict[str, int] = {k: int(n) for k, n in s.execute(update_q).all()}

            def grouped(col: Any) -> tuple[tuple[str, int], ...]:
                q = select(col, func.count()).where(active).group_by(col).order_by(col)
                return tuple((str(k), int(n)) for k, n in s.execute(q).all())

            by_site = grouped(d.site)
            by_model = grouped(d.hardware_model)
            phase = d.state["phase"].as_string()
            phase_q = select(phase, func.count()).where(active).group_by(phase)
            by_phase = sorted(
                ((k or "not reported", int(n)) for k, n in s.execute(phase_q).all()),
                key=lambda x: (-x[1], x[0]),
            )
            digest_q = select(d.active_digest, func.count()).where(active).group_by(d.active_digest)
            digests = s.execute(digest_q).all()
            images = self._images(s, (x for x, _ in digests))
        by_image = sorted(((images[k], int(n)) for k, n in digests), key=lambda x: -x[1])
        devices = int(by_status.get("active", 0))
        states = (
            (DeviceState.ONLINE, int(online.get(True, 0))),
            (DeviceState.OFFLINE, int(online.get(False, 0))),
            (DeviceState.UPDATING, int(sum(updates.get(x, 0) for x in IN_FLIGHT))),
            (DeviceState.FAILED, int(updates.get(DS.FAILED.value, 0))),
            (DeviceState.DECOMMISSIONED, int(sum(by_status.values())) - devices),
        )
        return Overview(
            devices=devices,
            decommissioned=states[-1][1],
            by_state=states,
            by_site=by_site,
            by_model=by_model,
            by_image=tuple(by_image),
            by_phase=tuple(by_phase),
            open_rollouts=self.rollouts(states=OPEN_ROLLOUTS),
        )

    # ------------------------------------------------------------------ rollouts

    def rollouts(
        self, states: Iterable[str] | None = None, limit: int = 200
    ) -> tuple[RolloutRow, ...]:
        """Rollouts newest first (at most ``limit``), with device counts by state."""
        r = m.Rollout
        q = (
            select(r, m.Release.component, m.Release.version)
            .join(m.Release, m.Release.bundle_id == r.release_id)
            .order_by(r.id.desc())
            .limit(limit)
        )
        if states is not None:
            q = q.where(r.state.in_(list(states)))
        with self.svc.sessions() as s:
            rows = s.execute(q).all()
            ids = [ro.id for ro, _, _ in rows]
            counts: dict[int, dict[str, int]] = defaultdict(dict)
            if ids:
                cq = (
                    select(m.RolloutDevice.rollout_id, m.RolloutDevice.state, func.count())
                    .where(m.RolloutDevice.rollout_id.in_(ids))
                    .group_by(m.RolloutDevice.rollout_id, m.RolloutDevice.state)
                )
                for rid, state, n in s.execute(cq).all():
                    counts[rid][state] = int(n)
        return tuple(
            RolloutRow(
                id=ro.id,
                name=ro.name,
                release=ro.release_id,
                release_label=f"{component} {version}",
                state=ro.state,
                reason=ro.reason,
                created_at=_aware(ro.created_at),
                counts=dict(counts.get(ro.id, {})),
            )
            for ro, component, version in rows
        )

    def rollout(self, rollout_id: int, decisions: int = 200, devices: int = 50) -> RolloutDetail:
        """One rollout: the scheduler's status, gates evaluated, decision log, devices to watch.

        Raises:
            NotFound: no such rollout.
        """
        status = self.svc.scheduler.status(rollout_id)
        now = self.svc.clock()
        rd = m.RolloutDevice
        with self.svc.sessions() as s:
            extra = {
                g.id: g
                for g in s.scalars(
                    select(m.RolloutGroup).where(m.RolloutGroup.rollout_id == rollout_id)
                )
            }
            rel = s.get(m.Release, status["release"])
            log = s.scalars(
                select(m.Decision)
                .where(m.Decision.rollout_id == rollout_id)
                .order_by(m.Decision.id.desc())
                .limit(decisions)
            ).all()

            def rows(states: Iterable[str]) -> tuple[RolloutDevice, ...]:
                q = (
                    select(
                        rd.device_id,
                        rd.site,
                        rd.state,
                        rd.phase,
                        rd.progress,
                        rd.error,
                        rd.updated_at,
                    )
                    .where(rd.rollout_id == rollout_id, rd.state.in_(list(states)))
                    .order_by(rd.updated_at.desc(), rd.device_id)
                    .limit(devices)
                )
                return tuple(RolloutDevice(*x) for x in s.execute(q).all())

            failed = rows([DS.FAILED.value])
            in_flight = rows(IN_FLIGHT)
        groups = []
        for g in status["groups"]:
            row = extra.get(g["id"])
            ack = row.failures_acknowledged if row else 0
            groups.append(
                GroupDetail(
                    doc=g,
                    checks=gate_checks(
                        g["gate"],
                        g["counts"],
                        total=g["total"],
                        acknowledged=ack,
                        gate_met_at=g["gate_met_at"],
                        now=now,
                        started=g["state"] != "scheduled",
                    ),
                    started_at=row.started_at if row else None,
                    finished_at=row.finished_at if row else None,
                    failures_acknowledged=ack,
                )
            )
        return RolloutDetail(
            status=status,
            release_label=f"{rel.component} {rel.version}" if rel else status["release"],
            groups=tuple(groups),
            decisions=tuple(Decision(x.at, x.actor, x.action, x.detail or {}) for x in log),
            failed=failed,
            in_flight=in_flight,
        )

    # ------------------------------------------------------------------ devices

    def _filtered(self, q: Select[Any], f: DeviceFilter) -> Select[Any]:
        d = m.Device
        if f.site is not None:
            q = q.where(d.site == f.site)
        if f.model is not None:
            q = q.where(d.hardware_model == f.model)
        if f.image == NO_IMAGE:
            q = q.where(d.active_digest.is_(None))
        elif f.image is not None:
            q = q.where(d.active_digest == f.image)
        match f.state:
            case DeviceState.DECOMMISSIONED:
                q = q.where(d.status != "active")
            case DeviceState.ONLINE | DeviceState.OFFLINE:
                q = q.where(d.status == "active", d.online == (f.state is DeviceState.ONLINE))
            case DeviceState.UPDATING | DeviceState.FAILED:
                latest = _latest_rows()
                wanted = IN_FLIGHT if f.state is DeviceState.UPDATING else (DS.FAILED.value,)
                q = q.where(
                    d.status == "active",
                    d.id.in_(select(latest.c.device_id).where(latest.c.state.in_(wanted))),
                )
            case None:
                pass
        return q

    def devices(self, f: DeviceFilter, page: int = 1, per_page: int = PER_PAGE) -> DevicePage:
        """One page of devices matching ``f``, ordered by id (LIMIT/OFFSET in SQL)."""
        if not 1 <= page <= MAX_PAGE:
            raise InvalidInput(f"page must be within 1..{MAX_PAGE}")
        d = m.Device
        cols = (
            d.id,
            d.site,
            d.hardware_model,
            d.status,
            d.online,
            d.last_seen,
            d.state,
            d.active_digest,
        )
        with self.svc.sessions() as s:
            total = int(s.scalar(self._filtered(select(func.count()).select_from(d), f)) or 0)
            q = self._filtered(select(*cols), f).order_by(d.id)
            rows = s.execute(q.offset((page - 1) * per_page).limit(per_page)).all()
            ids = [r[0] for r in rows]
            last = self._last_rows(s, ids)
            images = self._images(s, (r[7] for r in rows))
        return DevicePage(
            rows=tuple(
                DeviceRow(
                    id=i,
                    site=site,
                    model=model,
                    status=status,
                    online=bool(online),
                    last_seen=_aware(seen) if seen else None,
                    phase=_phase(state),
                    image=images[digest],
                    last=last.get(i),
                )
                for i, site, model, status, online, seen, state, digest in rows
            ),
            total=total,
            page=page,
            per_page=per_page,
        )

    @staticmethod
    def _last_rows(s: Session, ids: list[str]) -> dict[str, LastRollout]:
        """Each device's row in its newest rollout, for a page of ids."""
        if not ids:
            return {}
        rd = m.RolloutDevice
        q = (
            select(
                rd.device_id,
                rd.rollout_id,
                rd.state,
                rd.phase,
                rd.progress,
                rd.error,
                rd.updated_at,
            )
            .where(rd.device_id.in_(ids))
            .order_by(rd.rollout_id)
        )
        out: dict[str, LastRollout] = {}
        for device_id, rid, state, phase, progress, error, at in s.execute(q).all():
            # ascending rollout ids: the newest wins
            out[device_id] = LastRollout(rid, state, phase, progress, error, at)
        return out

    def filter_choices(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """(value, label) options of the device filters, from what the fleet holds."""
        d = m.Device
        with self.svc.sessions() as s:
            sites = s.scalars(select(d.site).distinct().order_by(d.site)).all()
            models = s.scalars(select(d.hardware_model).distinct().order_by(d.hardware_model)).all()
            digests = s.scalars(select(d.active_digest).distinct()).all()
            images = self._images(s, digests)
        return {
            "site": tuple((x, x) for x in sites),
            "model": tuple((x, x) for x in models),
            "state": tuple((x.value, x.value) for x in DeviceState),
            "image": tuple(
                sorted(
                    (img.filter_value, img.label)
                    for key, img in images.items()
                    if key is not None or None in digests
                )
            ),
        }

    def device(self, actor: Principal, device_id: str, limit: int = 30) -> DeviceDetail:
        """One device: its document, rollouts, last result and recent history.

        Raises:
            NotFound: not enrolled (or not visible to ``actor``).
        """
        check_device_id(device_id)
        doc = self.svc.get_device(actor, device_id)
        rd = m.RolloutDevice
        with self.svc.sessions() as s:
            rq = (
                select(
                    rd.rollout_id,
                    rd.state,
                    rd.phase,
                    rd.progress,
                    rd.error,
                    rd.updated_at,
                    m.Rollout.name,
                )
                .join(m.Rollout, m.Rollout.id == rd.rollout_id)
                .where(rd.device_id == device_id)
                .order_by(rd.rollout_id.desc())
                .limit(limit)
            )
            rollouts = tuple(LastRollout(*x) for x in s.execute(rq).all())
            cq = (
                select(
                    m.Command.counter,
                    m.Command.action,
                    m.Command.rollout_id,
                    m.Command.created_at,
                    m.Command.published_at,
                )
                .where(m.Command.device_id == device_id)
                .order_by(m.Command.id.desc())
                .limit(limit)
            )
            commands = s.execute(cq).all()
            aq = (
                select(m.AuditEntry.at, m.AuditEntry.actor, m.AuditEntry.action)
                .where(m.AuditEntry.target == device_id)
                .order_by(m.AuditEntry.id.desc())
                .limit(limit)
            )
            audit = s.execute(aq).all()
            image = self._images(s, [doc.get("active_digest")])[doc.get("active_digest")]
        timeline: list[TimelineEntry] = []
        for counter, action, rid, created, published in commands:
            sent = "published" if published is not None else "not yet published"
            timeline.append(
                TimelineEntry(created, "command", f"{action} command #{counter} ({sent})", rid)
            )
        for r in rollouts:
            what = (
                r.state
                + (f", phase {r.phase}" if r.phase else "")
                + (f", {r.progress}%" if r.progress else "")
            )
            what += f", error {r.error}" if r.error else ""
            timeline.append(TimelineEntry(r.updated_at, "rollout", what, r.rollout_id))
        for at, actor_name, action in audit:
            timeline.append(
                TimelineEntry(_aware(at).timestamp(), "audit", f"{action} by {actor_name}")
            )
        timeline.sort(key=lambda e: e.at, reverse=True)
        finished = {DS.SUCCEEDED.value, DS.FAILED.value, DS.ROLLED_BACK.value, DS.CANCELLED.value}
        last_result = next((r for r in rollouts if r.state in finished), None)
        return DeviceDetail(
            doc=doc,
            image=image,
            rollouts=rollouts,
            last_result=last_result,
            timeline=tuple(timeline[:limit]),
        )

    # ------------------------------------------------------------------ releases

    def releases(self) -> tuple[ReleaseRow, ...]:
        """Every release, newest upload first, with devices running it and rollouts of it."""
        docs = self.svc.releases.list_releases()
        d = m.Device
        with self.svc.sessions() as s:
            running = dict(
                s.execute(
                    select(d.active_digest, func.count())
                    .where(d.status == "active", d.active_digest.is_not(None))
                    .group_by(d.active_digest)
                ).all()
            )
            rollouts = dict(
                s.execute(
                    select(m.Rollout.release_id, func.count()).group_by(m.Rollout.release_id)
                ).all()
            )
        return tuple(
            ReleaseRow(
                doc=x,
                running=int(running.get(x["target_sha256"], 0)),
                rollouts=int(rollouts.get(x["bundle_id"], 0)),
            )
            for x in reversed(docs)
        )


def _phase(state: Any) -> str:
    phase = state.get("phase") if isinstance(state, Mapping) else None
    return phase if isinstance(phase, str) else ""


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they were stored as UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
