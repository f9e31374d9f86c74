"""The link model: a site's WAN link as a pure, clock-driven queue.

Rules:
- Pure: every method takes the time ``t`` (seconds since the run started) and returns times; no
  sleeping, no I/O. ``simulator/linked.py`` turns the answers into ``asyncio.sleep`` around the real
  transport, and tests drive it with plain numbers.
- One ``Link`` per site, shared by every device behind it: bandwidth is serialised (a message
  starts when the previous one has left), so fifty devices at a 1 Mbit/s site share 1 Mbit/s.
- Loss is TCP loss: a lost packet costs a retransmit (Linux' minimum RTO, 200 ms, or two
  latencies), never a lost MQTT message. Losing messages is what outages do: a message still on
  the wire when the link goes down is gone, and the sender must notice (the transport raises
  ``TransferError``) and resume.
- Outages are absolute windows; a flapping link adds periodic windows.
- A site relay is not modelled here: a relay site runs the real ``SiteRelay``
  (``simulator/siterelay.py``) and only the relay's upstream fetches go through the ``Link``.

    link = Link(LinkProfile(bandwidth=1_000_000, latency=0.05))
    link.send(0.0, 125_000)      # -> 1.05: one second on the wire plus latency
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

PACKET = 1448  # TCP payload per packet on a 1500-byte MTU
MIN_RTO = 0.2  # Linux' minimum retransmission timeout


@dataclass(frozen=True)
class Window:
    """A time window ``[start, end)`` in run seconds."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError("a window ends after it starts")


@dataclass(frozen=True)
class LinkProfile:
    """What a site's link can do. ``bandwidth`` in bit/s; None means not limiting."""

    bandwidth: int | None = None
    latency: float = 0.0
    loss: float = 0.0
    outages: tuple[Window, ...] = ()

    def __post_init__(self) -> None:
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError("bandwidth must be positive")
        if self.latency < 0 or not 0 <= self.loss < 1:
            raise ValueError("latency must be >= 0 and loss in [0, 1)")

    @staticmethod
    def flapping(start: float, period: float, down: float, times: int) -> tuple[Window, ...]:
        """Windows of a link that goes down for ``down`` s every ``period`` s, ``times`` times."""
        return tuple(Window(start + i * period, start + i * period + down) for i in range(times))


@dataclass
class LinkStats:
    """Counters for the report."""

    wan_bytes: int = 0  # everything that crossed the site's WAN link
    wan_chunk_bytes: int = 0  # of which bundle chunks (a relay site: the relay's fetches)
    wan_messages: int = 0
    lan_bytes: int = 0  # chunks a relay served its devices over the site LAN
    dropped_messages: int = 0
    retransmits: int = 0


@dataclass
class Link:
    """One site's link. Not thread-safe; one event loop drives it."""

    profile: LinkProfile
    seed: int = 0
    stats: LinkStats = field(default_factory=LinkStats)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 - seeded model, not security
        # When the wire is free for the next message; time may start negative (before the rollout).
        self._busy_until = float("-inf")
        self._outages = tuple(sorted(self.profile.outages, key=lambda w: w.start))

    # -- outages ----------------------------------------------------------------------------
    def up(self, t: float) -> bool:
        """Whether the link carries traffic at time ``t``."""
        return all(not (w.start <= t < w.end) for w in self._outages)

    def next_up(self, t: float) -> float:
        """The first time ``>= t`` at which the link is up."""
        moved = True
        while moved:
            moved = False
            for w in self._outages:
                if w.start <= t < w.end:
                    t, moved = w.end, True
        return t

    def _outage_within(self, start: float, end: float) -> Window | None:
        for w in self._outages:
            if w.start < end and start < w.end:
                return w
        return None

    # -- sending ----------------------------------------------------------------------------
    def _retransmit_delay(self, nbytes: int) -> float:
        if self.profile.loss <= 0:
            return 0.0
        packets = max(1, math.ceil(nbytes / PACKET))
        lost = sum(1 for _ in range(min(packets, 256)) if self._rng.random() < self.profile.loss)
        if packets > 256:  # large messages: scale the sample instead of drawing every packet
            lost = round(lost * packets / 256)
        self.stats.retransmits += lost
        return lost * max(MIN_RTO, 2 * self.profile.latency)

    def send(self, t: float, nbytes: int) -> float | None:
        """Put one message of ``nbytes`` on the WAN at ``t``.

        Returns:
            The arrival time at the far end, or None when the link is down at ``t`` or goes
            down before the message has arrived (the message is lost with the connection).
        """
        if not self.up(t):
            self.stats.dropped_messages += 1
            return None
        start = max(t, self._busy_until)
        wire = 0.0 if self.profile.bandwidth is None else nbytes * 8 / self.profile.bandwidth
        done = start + wire + self._retransmit_delay(nbytes)
        arrival = done + self.profile.latency
        if self._outage_within(t, arrival) is not None:
            # The connection died under the message; the wire time spent is lost too.
            self._busy_until = start
            self.stats.dropped_messages += 1
            return None
        self._busy_until = done
        self.stats.wan_bytes += nbytes
        self.stats.wan_messages += 1
        return arrival

    def send_chunk(self, t: float, nbytes: int) -> float | None:
        """Put one bundle chunk on the WAN at ``t`` (counted apart from control traffic).

        Returns:
            The arrival time at the far end, or None when the link loses it.
        """
        arrival = self.send(t, nbytes)
        if arrival is not None:
            self.stats.wan_chunk_bytes += nbytes
        return arrival

    def backlog(self, t: float) -> float:
        """Seconds of traffic queued on the wire at ``t`` (for the progress view)."""
        return max(0.0, self._busy_until - t)
