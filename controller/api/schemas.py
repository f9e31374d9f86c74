"""Request bodies of the API: strict, bounded pydantic models (unknown fields refused)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Name = Annotated[str, Field(min_length=1, max_length=128)]
Short = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenCreate(_Strict):
    """Issue an API token."""

    name: Name
    role: Annotated[str, Field(pattern="^(admin|operator|field-engineer|viewer)$")]
    sites: Annotated[list[Short], Field(max_length=100)] = []


class EnrollmentTokenCreate(_Strict):
    """Issue an enrollment token for one device."""

    site: Short
    hardware_model: Short
    ttl_seconds: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = 3600
    tags: Annotated[list[Short], Field(max_length=32)] = []


class EnrollRequest(_Strict):
    """A device enrolls itself with a single-use token."""

    token: Annotated[str, Field(min_length=1, max_length=200)]
    device_id: Short
    serial: Name
    hardware_model: Short
    csr_pem: Annotated[str, Field(min_length=1, max_length=16384)]


class Window(_Strict):
    """A maintenance window in the site's time zone."""

    start: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
    end: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
    days: Annotated[list[Annotated[int, Field(ge=0, le=6)]], Field(max_length=7)] = [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
    ]


class SitePut(_Strict):
    """A site's settings."""

    tz: Short = "UTC"
    windows: Annotated[list[Window], Field(max_length=32)] = []
    bandwidth_bps: Annotated[int, Field(ge=1, le=10**12)] | None = None


class GateBody(_Strict):
    """A phase gate."""

    min_successes: Annotated[int, Field(ge=0, le=1_000_000)] = 1
    threshold_pct: Annotated[int, Field(ge=0, le=100)] = 100
    max_failure_pct: Annotated[int, Field(ge=0, le=100)] = 0
    soak_seconds: Annotated[int, Field(ge=0, le=30 * 24 * 3600)] = 0
    health_tolerance_pct: Annotated[int, Field(ge=0, le=1000)] | None = None
    error_action: Annotated[str, Field(pattern="^(pause|abort)$")] = "pause"


class PhaseBody(_Strict):
    """A phase: cumulative percentage of the non-trial target, and its gate."""

    name: Short
    percent: Annotated[int, Field(ge=0, le=100)]
    gate: GateBody = GateBody()


class RolloutCreate(_Strict):
    """Create a rollout."""

    name: Short
    release: Annotated[str, Field(min_length=1, max_length=160)]
    hardware_models: Annotated[list[Short], Field(max_length=100)] = []
    tags: Annotated[list[Short], Field(max_length=100)] = []
    sites: Annotated[list[Short], Field(max_length=1000)] = []
    trial_devices: Annotated[list[Short], Field(max_length=1000)] = []
    trial_tag: Short | None = None
    trial_gate: GateBody | None = None
    phases: Annotated[list[PhaseBody], Field(max_length=20)] = []
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = 100
    max_in_flight_per_site: Annotated[int, Field(ge=1, le=100_000)] | None = None
    after_rollout: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    health_metric: Short | None = None


def as_dict(model: BaseModel) -> dict[str, Any]:
    """A model's fields as plain data."""
    return model.model_dump()
