"""Bandwidth throttling: token buckets, time-of-day windows per link profile, per-site budgets.

Pure: every call takes ``now`` (seconds; monotonic for buckets, wall-clock UNIX for windows), no
sleeping, no I/O. The caller sleeps for the delay it is given.

Rules:

* A ``TokenBucket`` runs on *debt*: ``reserve(n, now)`` always succeeds and returns how long to
  wait before the next send. Bytes that already arrived (a chunk's size is known only once it has
  arrived) are charged after the fact, and the average still converges to ``rate``.
* A ``LinkProfile`` gives the rate at a local time of day: the first matching window wins, else
  the default rate (e.g. full rate 01:00-05:00, 64 kbit/s otherwise). Windows may wrap midnight.
* A ``ScheduledBucket`` is a bucket whose rate follows a profile.
* ``SiteBudgets`` holds one scheduled bucket per site; the gateway charges every chunk it serves
  to the device's site, so all devices behind one link share one budget.

    bucket = TokenBucket(rate=125_000, burst=64_000)   # 1 Mbit/s
    delay = bucket.reserve(65_536, now=clock.monotonic())
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo


@dataclass
class TokenBucket:
    """A token bucket in bytes: ``rate`` bytes/s refill, at most ``burst`` tokens banked.

    ``rate <= 0`` means unlimited.
    """

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float | None = None

    def __post_init__(self) -> None:
        if self.burst < 0:
            raise ValueError("burst must be >= 0")
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now

    def delay(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 if a send may start now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def reserve(self, amount: float, now: float) -> float:
        """Charge ``amount`` bytes and return the seconds to wait before sending again."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        # A negative amount refunds an over-estimate, never beyond the burst.
        self.tokens = min(self.burst, self.tokens - amount)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate from ``now`` on (time-window changes); debt carries over."""
        self._refill(now)
        self.rate = rate


@dataclass(frozen=True)
class Window:
    """A daily window ``[start, end)`` in minutes after local midnight, at ``rate`` bytes/s."""

    start: int
    end: int
    rate: float

    def __post_init__(self) -> None:
        if not (0 <= self.start < 1440 and 0 <= self.end <= 1440) or self.start == self.end:
            raise ValueError("window bounds must be distinct minutes within a day")

    def contains(self, minute: int) -> bool:
        """Whether a minute of the day falls in the window (windows may wrap midnight)."""
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    @classmethod
    def parse(cls, text: str, rate: float) -> Window:
        """``Window.parse("01:00-05:00", rate)``."""
        start_s, _, end_s = text.partition("-")

        def minutes(hhmm: str) -> int:
            hours, _, mins = hhmm.strip().partition(":")
            return int(hours) * 60 + int(mins or 0)

        return cls(minutes(start_s), minutes(end_s), rate)


@dataclass(frozen=True)
class LinkProfile:
    """The rates of one kind of link through the day, in its site's time zone."""

    name: str
    default_rate: float
    burst: float
    windows: tuple[Window, ...] = ()
    tz: str = "UTC"

    def rate_at(self, wall_time: float) -> float:
        """The rate (bytes/s) at UNIX time ``wall_time`` in the profile's local time."""
        local = dt.datetime.fromtimestamp(wall_time, tz=ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        for window in self.windows:
            if window.contains(minute):
                return window.rate
        return self.default_rate

    @classmethod
    def flat(cls, rate: float, burst: float | None = None, name: str = "flat") -> LinkProfile:
        """A profile with one rate all day (``rate <= 0``: unlimited)."""
        return cls(name=name, default_rate=rate, burst=burst if burst is not None else rate / 4)


UNLIMITED = LinkProfile(name="unlimited", default_rate=0.0, burst=0.0)
# The field's default for a thin link: full rate at night, 64 kbit/s in the working day.
NIGHTLY = LinkProfile(
    name="nightly",
    default_rate=64_000 / 8,
    burst=16 * 1024,
    windows=(Window.parse("01:00-05:00", 0.0),),
)


@dataclass
class ScheduledBucket:
    """A token bucket whose rate follows a link profile's time-of-day windows."""

    profile: LinkProfile
    bucket: TokenBucket = field(init=False)
    _checked_minute: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(rate=self.profile.default_rate, burst=self.profile.burst)

    def _follow(self, mono: float, wall: float) -> None:
        minute = int(wall // 60)
        if minute != self._checked_minute:
            self._checked_minute = minute
            rate = self.profile.rate_at(wall)
            if rate != self.bucket.rate:
                self.bucket.set_rate(rate, mono)

    def reserve(self, amount: float, mono: float, wall: float) -> float:
        """Charge ``amount`` bytes; seconds to wait (rate as of local time ``wall``)."""
        self._follow(mono, wall)
        return self.bucket.reserve(amount, mono)

    def delay(self, mono: float, wall: float) -> float:
        """Seconds until a send may start."""
        self._follow(mono, wall)
        return self.bucket.delay(mono)


@dataclass
class SiteBudgets:
    """One scheduled bucket per site (server-enforced budget across every device at a site)."""

    profiles: dict[str, LinkProfile] = field(default_factory=dict)
    default: LinkProfile = UNLIMITED
    _buckets: dict[str, ScheduledBucket] = field(default_factory=dict, init=False)

    def _bucket(self, site: str | None) -> ScheduledBucket:
        key = site or ""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = ScheduledBucket(self.profiles.get(key, self.default))
            self._buckets[key] = bucket
        return bucket

    def delay(self, site: str | None, mono: float, wall: float) -> float:
        """Seconds until the site's link may carry the next chunk."""
        return self._bucket(site).delay(mono, wall)

    def charge(self, site: str | None, amount: float, mono: float, wall: float) -> float:
        """Charge a served chunk to its site; returns the site's delay after it."""
        return self._bucket(site).reserve(amount, mono, wall)
