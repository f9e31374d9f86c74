"""SQLAlchemy 2 models of the controller. Migrations in ``controller/db/migrations``.

Rules: ids that reach MQTT topics or file names are validated before they get here (see
``controller/ids.py``); JSON columns hold small documents only (tags, targets, health); signed
documents are stored as the exact bytes that were signed or verified.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base; ``Base.metadata`` is what Alembic compares against."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


class ApiToken(Base):
    """An API token: only its SHA-256 is stored."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    sites: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(100))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEntry(Base):
    """One privileged action, with the token name that did it."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(60))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Site(Base):
    """A site: time zone, maintenance windows, bandwidth budget of its link."""

    __tablename__ = "sites"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    tz: Mapped[str] = mapped_column(String(64), default="UTC")
    windows: Mapped[list[Any]] = mapped_column(JSON, default=list)
    bandwidth_bps: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class EnrollmentToken(Base):
    """Single-use, expiring, scoped to a site and a hardware model; only the hash is kept."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    site: Mapped[str] = mapped_column(String(64))
    hardware_model: Mapped[str] = mapped_column(String(64))
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(100))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Device(Base):
    """An enrolled device and what it last reported."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hardware_model: Mapped[str] = mapped_column(String(64), index=True)
    serial: Mapped[str] = mapped_column(String(128))
    site: Mapped[str] = mapped_column(String(64), index=True)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(20), default="active")
    cert_serial: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    active_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    health: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # design: per-device command counter, strictly increasing; a command row is written with the
    # next value in the same transaction that bumps it, so no counter is ever used twice.
    command_counter: Mapped[int] = mapped_column(BigInteger, default=0)


class RevokedCert(Base):
    """A revoked device certificate (the CRL is rebuilt from this table)."""

    __tablename__ = "revoked_certs"
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Release(Base):
    """A verified release (bundle) and its signed manifest, byte for byte."""

    __tablename__ = "releases"
    bundle_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    component: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    security_version: Mapped[int] = mapped_column(Integer)
    hardware_models: Mapped[list[Any]] = mapped_column(JSON)
    target_sha256: Mapped[str] = mapped_column(String(64))
    target_size: Mapped[int] = mapped_column(BigInteger)
    requires: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    notes: Mapped[str] = mapped_column(Text, default="")
    uploaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    uploaded_by: Mapped[str] = mapped_column(String(100))


class Payload(Base):
    """What a device downloads for a release: the release's own payload or a controller delta.

    ``payload_id`` is the ``bundle_id`` a device names in chunk requests.
    """

    __tablename__ = "payloads"
    payload_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.bundle_id"), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    base_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    chunks: Mapped[list[Any]] = mapped_column(JSON)
    size: Mapped[int] = mapped_column(BigInteger)
    doc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class Rollout(Base):
    """A rollout of one release to a target."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.bundle_id"))
    state: Mapped[str] = mapped_column(String(20), index=True)
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_in_flight: Mapped[int] = mapped_column(Integer)
    max_in_flight_per_site: Mapped[int | None] = mapped_column(Integer, nullable=True)
    after_rollout: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(100))


class RolloutGroup(Base):
    """A phase of a rollout with its gate."""

    __tablename__ = "rollout_groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(20))
    total: Mapped[int] = mapped_column(Integer)
    gate: Mapped[dict[str, Any]] = mapped_column(JSON)
    gate_met_at: Mapped[float | None] = mapped_column(nullable=True)
    failures_acknowledged: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float | None] = mapped_column(nullable=True)
    finished_at: Mapped[float | None] = mapped_column(nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class RolloutDevice(Base):
    """One device's part in a rollout; ``state`` is a ``DeviceRolloutState`` value."""

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_group_state", "group_id", "state"),)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("rollout_groups.id"))
    state: Mapped[str] = mapped_column(String(20))
    site: Mapped[str] = mapped_column(String(64))
    payload_id: Mapped[str | None] = mapped_column(String(160), nullable=True)
    counter: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    phase: Mapped[str] = mapped_column(String(30), default="")
    progress: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(String(200), default="")
    updated_at: Mapped[float] = mapped_column(default=0.0)


class Command(Base):
    """Outbox of signed commands: written with the decision, published after commit."""

    __tablename__ = "commands"
    __table_args__ = (UniqueConstraint("device_id", "counter"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    counter: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(20))
    rollout_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column()
    published_at: Mapped[float | None] = mapped_column(nullable=True, index=True)


class Decision(Base):
    """Every planner decision and operator action on a rollout, in order."""

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(Integer, index=True)
    at: Mapped[float] = mapped_column()
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
