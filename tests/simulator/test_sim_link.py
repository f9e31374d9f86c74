"""The link model is pure: feed it times, read back arrival times."""

from __future__ import annotations

import pytest

from simulator.link import MIN_RTO, Link, LinkProfile, Window


def test_bandwidth_serialises_messages_of_one_site() -> None:
    link = Link(LinkProfile(bandwidth=1_000_000, latency=0.05))
    first = link.send(0.0, 125_000)  # one second on a 1 Mbit/s wire
    second = link.send(0.0, 125_000)  # queued behind the first
    assert first == pytest.approx(1.05)
    assert second == pytest.approx(2.05)
    assert link.stats.wan_bytes == 250_000
    assert link.backlog(0.5) == pytest.approx(1.5)


def test_unlimited_link_adds_only_latency() -> None:
    link = Link(LinkProfile(latency=0.01))
    assert link.send(3.0, 10**9) == pytest.approx(3.01)


def test_message_sent_into_an_outage_is_lost() -> None:
    link = Link(LinkProfile(bandwidth=8_000, outages=(Window(5.0, 8.0),)))
    assert link.send(6.0, 10) is None
    assert not link.up(6.0)
    assert link.next_up(6.0) == 8.0
    assert link.send(8.0, 10) == pytest.approx(8.01)


def test_outage_starting_mid_message_drops_it_and_frees_the_wire() -> None:
    link = Link(LinkProfile(bandwidth=8_000, outages=(Window(5.0, 6.0),)))
    assert link.send(4.5, 1000) is None  # needs 1 s of wire, the link dies after 0.5 s
    assert link.stats.dropped_messages == 1
    assert link.send(6.0, 1000) == pytest.approx(7.0)


def test_flapping_windows_and_overlaps() -> None:
    windows = LinkProfile.flapping(start=10, period=4, down=1, times=3)
    assert windows == (Window(10, 11), Window(14, 15), Window(18, 19))
    link = Link(LinkProfile(outages=(Window(0, 2), Window(1.5, 3))))
    assert link.next_up(0.5) == 3


def test_loss_costs_retransmits_not_messages() -> None:
    lossy = Link(LinkProfile(bandwidth=10_000_000, loss=0.2), seed=3)
    clean = Link(LinkProfile(bandwidth=10_000_000))
    t_lossy = [lossy.send(0.0, 64 * 1024) for _ in range(20)]
    t_clean = [clean.send(0.0, 64 * 1024) for _ in range(20)]
    assert all(t is not None for t in t_lossy)
    assert lossy.stats.retransmits > 0
    assert t_lossy[-1] is not None
    assert t_clean[-1] is not None
    assert t_lossy[-1] >= t_clean[-1] + MIN_RTO


def test_every_chunk_crosses_the_wan_and_is_counted_apart() -> None:
    # No relay in the model any more (a relay site runs the real SiteRelay): each send_chunk is
    # one WAN copy, and chunk bytes are counted apart from control traffic.
    link = Link(LinkProfile(bandwidth=80_000))
    arrivals = [link.send_chunk(0.0, 10_000) for _ in range(3)]
    link.send(0.0, 100)
    assert arrivals == [pytest.approx(1.0), pytest.approx(2.0), pytest.approx(3.0)]
    assert link.stats.wan_chunk_bytes == 30_000
    assert link.stats.wan_bytes == 30_100


def test_same_seed_same_answers() -> None:
    runs = []
    for _ in range(2):
        link = Link(LinkProfile(bandwidth=1_000_000, loss=0.1), seed=11)
        runs.append([link.send(float(i), 50_000) for i in range(10)])
    assert runs[0] == runs[1]


def test_invalid_profiles_are_refused() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        LinkProfile(bandwidth=0)
    with pytest.raises(ValueError, match="loss"):
        LinkProfile(loss=1.0)
    with pytest.raises(ValueError, match="window"):
        Window(3, 2)
