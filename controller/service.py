"""The controller service: registry, enrollment, releases, rollouts, in one object.

This is the Python API the HTTP routes, the simulator and the demo call in-process::

    svc = ControllerService(ControllerConfig(database_url="sqlite:///c.db", data_dir=Path("d")),
                            gateway=my_gateway)
    admin = svc.bootstrap_admin_token()          # a fresh admin API token (shown once)
    svc.tick()                                   # one scheduler round: plan, persist, publish
    svc.on_event("gw-1", {"type": "phase", ...})  # device traffic (ControllerInbox)

Rules:

* Every state change happens in one database transaction with its audit entry or decision row;
  commands are written to an outbox in that transaction and published after it commits, so a
  crash at any instant loses no decision and never makes a second command for a device
  (``controller/rollout/scheduler.py``).
* The service raises ``controller.errors`` only; the API maps their codes to HTTP status.
* ``Principal`` is who is acting; site scope (field engineers) is enforced here, role checks at
  the route (``controller.auth.ALLOWED``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller import auth
from controller.auth import Role
from controller.db import models as m
from controller.db.engine import make_engine, migrate, session_factory
from controller.errors import (
    Conflict,
    EnrollmentRefused,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthorized,
)
from controller.ids import check_device_id, check_enrollable_device_id, check_id
from controller.pki import FleetCA
from controller.ports import DeviceGateway
from controller.rollout.targeting import check_tz, check_windows

log = logging.getLogger(__name__)

MAX_ENROLL_TTL = 7 * 24 * 3600


@dataclass(frozen=True)
class ControllerConfig:
    """Where the controller keeps its state and what it tells devices."""

    database_url: str
    data_dir: Path
    broker_url: str = "mqtts://127.0.0.1:8883"
    max_upload_bytes: int = 4 * 1024**3
    command_ttl_seconds: int = 24 * 3600
    cert_days: int = 825
    health_metric: str = "errors"
    # Verified chunks kept in memory for serving (controller/releases.py); 0 turns it off.
    chunk_cache_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class Principal:
    """Who is calling: token name, role, and (field engineers) the sites it may act on."""

    name: str
    role: Role
    sites: tuple[str, ...] = ()

    def may_see_site(self, site: str) -> bool:
        """Field engineers see their sites only; every other role sees all."""
        return self.role is not Role.FIELD_ENGINEER or site in self.sites


SYSTEM = Principal("controller", Role.ADMIN)


@dataclass(frozen=True)
class Enrolled:
    """What a device receives on enrollment."""

    device_id: str
    certificate_pem: str
    ca_pem: str
    trust_root: dict[str, Any] | None
    broker_url: str


@dataclass
class _Caches:
    """Hot read paths of the gateway (chunk requests), refreshed on writes."""

    site_of: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they were stored as UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class ControllerService:
    """The controller's service layer (see module docstring)."""

    def __init__(
        self,
        config: ControllerConfig,
        gateway: DeviceGateway | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.gateway = gateway
        self.clock = clock
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(config.database_url)
        migrate(self.engine)
        self.sessions = session_factory(self.engine)
        self.ca = FleetCA.load_or_create(config.data_dir / "ca")
        self._caches = _Caches()
        # Imported here to keep the import graph one-way (these modules import this one's types).
        from controller.releases import ReleaseStore  # noqa: PLC0415
        from controller.reports import Reports  # noqa: PLC0415
        from controller.rollout.scheduler import Scheduler  # noqa: PLC0415

        self.releases = ReleaseStore(self)
        self.scheduler = Scheduler(self)
        self.reports = Reports(self)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    # ------------------------------------------------------------------ tokens and audit

    def audit(self, s: Session, actor: Principal, action: str, target: str, **detail: Any) -> None:
        """Add an audit entry to the caller's transaction."""
        s.add(
            m.AuditEntry(
                at=_utc(self.clock()),
                actor=actor.name,
                action=action,
                target=target,
                detail=detail,
            )
        )

    def bootstrap_admin_token(self, name: str = "bootstrap-admin") -> str:
        """Issue a new admin token without a caller (first start, simulator, demo)."""
        return self.issue_api_token(SYSTEM, name, Role.ADMIN, ())

    def has_admin(self) -> bool:
        """Whether any unrevoked admin token exists."""
        with self.sessions() as s:
            q = (
                select(func.count())
                .select_from(m.ApiToken)
                .where(m.ApiToken.role == Role.ADMIN.value, m.ApiToken.revoked.is_(False))
            )
            return bool(s.scalar(q))

    def issue_api_token(self, actor: Principal, name: str, role: Role, sites: Iterable[str]) -> str:
        """Create an API token; the plain token is returned once and never stored."""
        check_id(name, "token name")
        sites = tuple(check_id(x, "site") for x in sites)
        if role is Role.FIELD_ENGINEER and not sites:
            raise InvalidInput("a field-engineer token needs at least one site")
        token = auth.new_token()
        with self.sessions.begin() as s:
            s.add(
                m.ApiToken(
                    name=name,
                    token_hash=auth.hash_token(token),
                    role=role.value,
                    sites=list(sites),
                    created_at=_utc(self.clock()),
                    created_by=actor.name,
                    revoked=False,
                )
            )
            self.audit(s, actor, "token.issue", name, role=role.value, sites=list(sites))
        return token

    def list_api_tokens(self) -> list[dict[str, Any]]:
        """Every API token (without secrets)."""
        with self.sessions() as s:
            rows = s.scalars(select(m.ApiToken).order_by(m.ApiToken.id)).all()
            return [
                {
                    "id": t.id,
                    "name": t.name,
                    "role": t.role,
                    "sites": t.sites,
                    "revoked": t.revoked,
                    "created_by": t.created_by,
                }
                for t in rows
            ]

    def revoke_api_token(self, actor: Principal, token_id: int) -> None:
        """Revoke an API token by id."""
        with self.sessions.begin() as s:
            row = s.get(m.ApiToken, token_id)
            if row is None:
                raise NotFound(f"API token {token_id} does not exist")
            row.revoked = True
            self.audit(s, actor, "token.revoke", row.name)

    def authenticate(self, token: str | None) -> Principal:
        """The principal of a bearer token.

        Raises:
            Unauthorized: missing, malformed, unknown or revoked.
        """
        if not token:
            raise Unauthorized("missing bearer token")
        if not auth.well_formed(token):
            raise Unauthorized("malformed bearer token")
        with self.sessions() as s:
            row = s.scalar(
                select(m.ApiToken).where(m.ApiToken.token_hash == auth.hash_token(token))
            )
            if row is None or row.revoked:
                raise Unauthorized("unknown or revoked token")
            return Principal(row.name, Role(row.role), tuple(row.sites))

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest audit entries first."""
        with self.sessions() as s:
            rows = s.scalars(select(m.AuditEntry).order_by(m.AuditEntry.id.desc()).limit(limit))
            return [
                {
                    "at": _aware(a.at).isoformat(),
                    "actor": a.actor,
                    "action": a.action,
                    "target": a.target,
                    "detail": a.detail,
                }
                for a in rows
            ]

    # ------------------------------------------------------------------ sites

    def put_site(
        self,
        actor: Principal,
        name: str,
        tz: str = "UTC",
        windows: list[dict[str, Any]] | None = None,
        bandwidth_bps: int | None = None,
    ) -> dict[str, Any]:
        """Create or update a site's time zone, maintenance windows and bandwidth budget."""
        check_id(name, "site")
        try:
            tz = check_tz(tz)
            norm = check_windows(windows or [])
        except ValueError as e:
            raise InvalidInput(str(e)) from e
        if bandwidth_bps is not None and not 0 < bandwidth_bps <= 10**12:
            raise InvalidInput("bandwidth_bps must be within 1..10^12")
        with self.sessions.begin() as s:
            site = s.get(m.Site, name) or m.Site(name=name)
            site.tz, site.windows, site.bandwidth_bps = tz, norm, bandwidth_bps
            s.add(site)
            self.audit(s, actor, "site.put", name, tz=tz, windows=norm, bandwidth_bps=bandwidth_bps)
        return self.get_site(name)

    def get_site(self, name: str) -> dict[str, Any]:
        """One site."""
        with self.sessions() as s:
            site = s.get(m.Site, name)
            if site is None:
                raise NotFound(f"site {name!r} does not exist")
            return {
                "name": site.name,
                "tz": site.tz,
                "windows": site.windows,
                "bandwidth_bps": site.bandwidth_bps,
            }

    def list_sites(self) -> list[dict[str, Any]]:
        """Every site."""
        with self.sessions() as s:
            return [
                {"name": x.name, "tz": x.tz, "windows": x.windows, "bandwidth_bps": x.bandwidth_bps}
                for x in s.scalars(select(m.Site).order_by(m.Site.name))
            ]

    def site_budget(self, site: str) -> int | None:
        """Bits per second the site's link may carry for updates (None: no limit)."""
        with self.sessions() as s:
            row = s.get(m.Site, site)
            return row.bandwidth_bps if row else None

    # ------------------------------------------------------------------ enrollment

    def issue_enrollment_token(
        self,
        actor: Principal,
        site: str,
        hardware_model: str,
        ttl_seconds: int = 3600,
        tags: Iterable[str] = (),
    ) -> dict[str, Any]:
        """A single-use enrollment token for one device of ``hardware_model`` at ``site``."""
        check_id(site, "site")
        check_id(hardware_model, "hardware model")
        tags = [check_id(t, "tag") for t in tags]
        if not 60 <= ttl_seconds <= MAX_ENROLL_TTL:
            raise InvalidInput(f"ttl_seconds must be within 60..{MAX_ENROLL_TTL}")
        if not actor.may_see_site(site):
            raise Forbidden(f"token {actor.name!r} may not enroll devices at site {site!r}")
        token = auth.new_token(auth.ENROLL_PREFIX)
        expires = self.clock() + ttl_seconds
        with self.sessions.begin() as s:
            s.add(
                m.EnrollmentToken(
                    token_hash=auth.hash_token(token),
                    site=site,
                    hardware_model=hardware_model,
                    tags=tags,
                    expires_at=_utc(expires),
                    created_by=actor.name,
                )
            )
            self.audit(
                s,
                actor,
                "enroll_token.issue",
                site,
                hardware_model=hardware_model,
                ttl_seconds=ttl_seconds,
            )
        return {
            "token": token,
            "site": site,
            "hardware_model": hardware_model,
            "expires": int(expires),
        }

    def enroll(
        self, token: str, device_id: str, serial: str, hardware_model: str, csr_pem: str
    ) -> Enrolled:
        """Enroll a device with a single-use token: sign its CSR, register it.

        The token is consumed by one conditional UPDATE (unused, unexpired, same hardware
        model), so of concurrent uses exactly one matches a row; the device row is inserted in
        the same transaction, so a refused insert leaves the token unused.

        Raises:
            EnrollmentRefused: unknown, used, expired or out-of-scope token.
            InvalidInput: bad ids or CSR; a reserved id such as ``relay-<site>`` (code
                ``enroll.device_id_reserved``; the token stays unused).
            Conflict: the device id is already enrolled.
        """
        check_enrollable_device_id(device_id)
        check_id(hardware_model, "hardware model")
        if not isinstance(serial, str) or not 0 < len(serial) <= 128 or not serial.isprintable():
            raise InvalidInput("serial must be 1..128 printable characters")
        if not auth.well_formed(token, auth.ENROLL_PREFIX):
            raise EnrollmentRefused("enrollment token is malformed")
        cert_pem, cert_serial = self.ca.sign_csr(csr_pem, device_id, days=self.config.cert_days)
        now = self.clock()
        h = auth.hash_token(token)
        try:
            with self.sessions.begin() as s:
                res = s.execute(
                    update(m.EnrollmentToken)
                    .where(
                        m.EnrollmentToken.token_hash == h,
                        m.EnrollmentToken.used_at.is_(None),
                        m.EnrollmentToken.expires_at > _utc(now),
                        m.EnrollmentToken.hardware_model == hardware_model,
                    )
                    .values(used_at=_utc(now), used_by=device_id)
                    .returning(m.EnrollmentToken.site, m.EnrollmentToken.tags)
                ).first()
                if res is None:
                    raise EnrollmentRefused(self._why_refused(s, h, hardware_model, now))
                site, tags = res
                if s.get(m.Device, device_id) is not None:
                    raise Conflict(f"device {device_id!r} is already enrolled")
                s.add(
                    m.Device(
                        id=device_id,
                        hardware_model=hardware_model,
                        serial=serial,
                        site=site,
                        tags=list(tags),
                        status="active",
                        cert_serial=cert_serial,
                        enrolled_at=_utc(now),
                        versions={},
                        health={},
                        state={},
                        command_counter=0,
                    )
                )
                if s.get(m.Site, site) is None:
                    s.add(m.Site(name=site, tz="UTC", windows=[], bandwidth_bps=None))
                self.audit(
                    s,
                    Principal(f"enroll:{device_id}", Role.VIEWER),
                    "device.enroll",
                    device_id,
                    site=site,
                    hardware_model=hardware_model,
                    serial=serial,
                )
        except IntegrityError as e:
            raise Conflict(f"device {device_id!r} is already enrolled") from e
        with self._caches.lock:
            self._caches.site_of[device_id] = site
        return Enrolled(
            device_id=device_id,
            certificate_pem=cert_pem,
            ca_pem=self.ca.cert_pem,
            trust_root=self.trust_root(),
            broker_url=self.config.broker_url,
        )

    def _why_refused(self, s: Session, h: str, model: str, now: float) -> str:
        row = s.scalar(select(m.EnrollmentToken).where(m.EnrollmentToken.token_hash == h))
        if row is None:
            return "enrollment token is unknown"
        if row.used_at is not None:
            return "enrollment token was already used"
        if _aware(row.expires_at) <= _utc(now):
            return "enrollment token has expired"
        if row.hardware_model != model:
            return f"enrollment token is for hardware model {row.hardware_model!r}, not {model!r}"
        return "enrollment token was already used"

    def trust_root(self) -> dict[str, Any] | None:
        """The bundle trust root devices receive on enrollment (``<data-dir>/trust.json``)."""
        path = self.config.data_dir / "trust.json"
        if not path.exists():
            return None
        doc: dict[str, Any] = json.loads(path.read_bytes())
        return doc

    def decommission(self, actor: Principal, device_id: str) -> None:
        """Retire a device: revoke its certificate (the CRL is rewritten for the broker)."""
        check_device_id(device_id)
        now = self.clock()
        with self.sessions.begin() as s:
            dev = s.get(m.Device, device_id)
            if dev is None:
                raise NotFound(f"device {device_id!r} is not enrolled")
            if dev.status == "decommissioned":
                raise Conflict(f"device {device_id!r} is already decommissioned")
            dev.status = "decommissioned"
            with self._caches.lock:
                self._caches.site_of.pop(device_id, None)
            s.merge(
                m.RevokedCert(serial=dev.cert_serial, device_id=device_id, revoked_at=_utc(now))
            )
            self.audit(s, actor, "device.decommission", device_id)
            s.flush()
            revoked = [(r.serial, _aware(r.revoked_at)) for r in s.scalars(select(m.RevokedCert))]
            self.ca.write_crl(revoked)

    # ------------------------------------------------------------------ devices

    @staticmethod
    def _device_doc(d: m.Device) -> dict[str, Any]:
        return {
            "id": d.id,
            "hardware_model": d.hardware_model,
            "serial": d.serial,
            "site": d.site,
            "tags": d.tags,
            "status": d.status,
            "online": d.online,
            "last_seen": _aware(d.last_seen).isoformat() if d.last_seen else None,
            "active_digest": d.active_digest,
            "versions": d.versions,
            "health": d.health,
            "enrolled_at": _aware(d.enrolled_at).isoformat(),
        }

    def list_devices(
        self,
        actor: Principal,
        *,
        site: str | None = None,
        hardware_model: str | None = None,
        tag: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Devices visible to ``actor``, filtered."""
        q = select(m.Device).order_by(m.Device.id)
        if site is not None:
            q = q.where(m.Device.site == check_id(site, "site"))
        if actor.role is Role.FIELD_ENGINEER:
            q = q.where(m.Device.site.in_(actor.sites))
        if hardware_model is not None:
            q = q.where(m.Device.hardware_model == check_id(hardware_model, "hardware model"))
        if tag is not None:
            check_id(tag, "tag")
        if tag is None:
            q = q.offset(offset).limit(limit)
        with self.sessions() as s:
            rows = s.scalars(q).all()
        if tag is None:
            return [self._device_doc(d) for d in rows]
        # Tags are a JSON list: filtered here, the same way on SQLite and PostgreSQL.
        docs = [self._device_doc(d) for d in rows if tag in d.tags]
        return docs[offset : offset + limit]

    def get_device(self, actor: Principal, device_id: str) -> dict[str, Any]:
        """One device (field engineers: only at their sites)."""
        check_device_id(device_id)
        with self.sessions() as s:
            d = s.get(m.Device, device_id)
            if d is None or not actor.may_see_site(d.site):
                raise NotFound(f"device {device_id!r} is not enrolled")
            doc = self._device_doc(d)
            doc["state"] = d.state
            doc["command_counter"] = d.command_counter
            return doc

    # ------------------------------------------------------------------ inbox: ControllerInbox

    def on_state(self, device_id: str, state: Mapping[str, Any]) -> None:
        """A device's retained state: active slot digest, component versions, health (queued)."""
        self.reports.put("state", device_id, state)

    def on_event(self, device_id: str, event: Mapping[str, Any]) -> None:
        """A device event: phase transitions and results of a rollout's command (queued)."""
        self.reports.put("event", device_id, event)

    def on_online(self, device_id: str, online: bool) -> None:
        """Presence: connect, or the last will (queued)."""
        self.reports.put("online", device_id, online)

    def drain_reports(self) -> int:
        """Apply every queued device report now (``tick`` does this first)."""
        return self.reports.drain()

    def known_devices(self, device_ids: Iterable[str]) -> set[str]:
        """The enrolled, active devices among ``device_ids`` (one query for the uncached)."""
        ids = set(device_ids)
        with self._caches.lock:
            known = {d for d in ids if d in self._caches.site_of}
        missing = sorted(ids - known)
        with self.sessions() as s:
            for i in range(0, len(missing), 500):
                rows = s.execute(
                    select(m.Device.id, m.Device.site).where(
                        m.Device.id.in_(missing[i : i + 500]), m.Device.status == "active"
                    )
                ).all()
                with self._caches.lock:
                    for device_id, site in rows:
                        self._caches.site_of[device_id] = site
                        known.add(device_id)
        return known

    def known_device(self, device_id: str) -> bool:
        """Whether ``device_id`` is an enrolled, active device (cached)."""
        with self._caches.lock:
            if device_id in self._caches.site_of:
                return True
        with self.sessions() as s:
            d = s.get(m.Device, device_id)
            if d is None or d.status != "active":
                return False
            with self._caches.lock:
                self._caches.site_of[device_id] = d.site
            return True

    # ------------------------------------------------------------------ ChunkSource

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        """Chunk bytes for a device that was commanded to fetch ``bundle_id``."""
        return self.releases.resolve_chunk(device_id, bundle_id, index)

    def site_of(self, device_id: str) -> str | None:
        """The site of a device (or of a relay ``relay-<site>``: its fetches share the budget)."""
        if self.known_device(device_id):
            with self._caches.lock:
                return self._caches.site_of.get(device_id)
        return self.relay_site(device_id)

    def relay_site(self, identity: str) -> str | None:
        """The site whose relay ``identity`` is (``relay-<site>``), else None.

        The broker ACL ties a fetch topic to the sender's certificate CN, and enrollment never
        signs a ``relay-`` CN, so only a relay certificate issued by the operator gets here. A
        device enrolled under such an id before the prefix was reserved stays a device: it gets
        its own offers, never its namesake site's.
        """
        from controller.releases import relay_site_of  # noqa: PLC0415 - lazy, as ReleaseStore

        site = relay_site_of(identity)
        if site is None:
            return None
        with self.sessions() as s:
            if s.get(m.Device, identity) is not None:
                return None
        return site

    # ------------------------------------------------------------------ scheduler

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """One scheduler round over every running rollout; see ``Scheduler.tick``."""
        return self.scheduler.tick(now)

    def publish_pending(self) -> int:
        """Publish commands written but not yet handed to the gateway (e.g. after a crash)."""
        return self.scheduler.publish_pending()
