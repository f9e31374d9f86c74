"""Token buckets, time-of-day windows and site budgets (pure: time is passed in)."""

from __future__ import annotations

import datetime as dt

import pytest

from firmware_bundles.throttle import (
    NIGHTLY,
    LinkProfile,
    ScheduledBucket,
    SiteBudgets,
    TokenBucket,
    Window,
)


def _simulate(bucket: TokenBucket, chunk: int, seconds: float) -> float:
    """Send chunks whenever the bucket allows; return the average rate over ``seconds``."""
    now, sent = 0.0, 0
    while now < seconds:
        now += bucket.delay(now)
        if now >= seconds:
            break
        bucket.reserve(chunk, now)
        sent += chunk
    return sent / seconds


@pytest.mark.parametrize("chunk", [1000, 65536, 300_000])
def test_average_rate_converges_to_the_cap_whatever_the_chunk_size(chunk: int) -> None:
    rate = 125_000.0
    achieved = _simulate(TokenBucket(rate=rate, burst=64_000), chunk, 600.0)
    assert achieved == pytest.approx(rate, rel=0.01)


def test_unlimited_bucket_never_waits() -> None:
    bucket = TokenBucket(rate=0, burst=0)
    assert bucket.reserve(10**9, 0.0) == 0.0


def test_burst_is_banked_but_bounded() -> None:
    bucket = TokenBucket(rate=100, burst=1000)
    assert bucket.reserve(1000, 0.0) == 0.0
    assert bucket.reserve(100, 0.0) == pytest.approx(1.0)
    # A long idle spell banks at most `burst`.
    assert bucket.delay(1000.0) == 0.0
    assert bucket.reserve(1500, 1000.0) == pytest.approx(5.0)


def test_window_wraps_midnight() -> None:
    w = Window.parse("22:00-02:00", 1.0)
    assert w.contains(23 * 60)
    assert w.contains(60)
    assert not w.contains(12 * 60)
    with pytest.raises(ValueError, match="distinct"):
        Window(60, 60, 1.0)


def _at(hour: int, tz: str = "UTC") -> float:
    return dt.datetime(2026, 11, 27, hour, 30, tzinfo=dt.UTC).timestamp() if tz == "UTC" else 0.0


def test_profile_rate_follows_local_time() -> None:
    profile = LinkProfile(
        "thin",
        default_rate=8000,
        burst=1000,
        windows=(Window.parse("01:00-05:00", 250_000),),
        tz="Europe/Berlin",
    )
    # 02:30 UTC is 03:30 in Berlin (CET): inside the night window.
    assert profile.rate_at(_at(2)) == 250_000
    # 04:30 UTC is 05:30 in Berlin: outside.
    assert profile.rate_at(_at(4)) == 8000
    assert NIGHTLY.rate_at(_at(3)) == 0.0  # full rate at night
    assert NIGHTLY.rate_at(_at(12)) == 8000


def test_scheduled_bucket_switches_rate_at_the_window_edge() -> None:
    profile = LinkProfile(
        "p", default_rate=1000, burst=0, windows=(Window.parse("01:00-02:00", 100_000),)
    )
    bucket = ScheduledBucket(profile)
    day = _at(0) - 30 * 60  # 00:00 UTC
    assert bucket.reserve(10_000, 0.0, day + 3600 - 1) == pytest.approx(10.0)
    # One second later it is 01:00 and the rate is 100x: the remaining 9000 drain in 0.09 s.
    assert bucket.delay(1.0, day + 3600) == pytest.approx(0.09)


def test_site_budget_is_shared_by_every_device_at_the_site() -> None:
    budgets = SiteBudgets(profiles={"s1": LinkProfile.flat(1000, burst=0)})
    assert budgets.charge("s1", 500, 0.0, 0.0) == pytest.approx(0.5)
    assert budgets.delay("s1", 0.0, 0.0) == pytest.approx(0.5)
    assert budgets.charge("s1", 500, 0.0, 0.0) == pytest.approx(1.0)
    # Another site and the unknown site are unaffected.
    assert budgets.delay("s2", 0.0, 0.0) == 0.0
    assert budgets.delay(None, 0.0, 0.0) == 0.0
