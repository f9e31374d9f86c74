"""A site's devices behind a real link: the simulator's side of ``simulator/netns.py``.

Rules:
- ``[[site]] netns = N``: the site's first N devices run in one network namespace per site (a
  site's devices share one WAN link, as in the model), in their own worker process that enters
  the namespace before it opens a socket. They run the same worker code as every virtual
  device, with the site's link model made transparent (it counts bytes, it never delays): the
  kernel link shapes them (htb rate both ways, iptables loss both ways, the latency by netem or,
  on kernels without it, by the root end's relay in ``simulator/wanproxy.py``).
- They reach the run's broker through that relay on the veth's host address.
- What is made is removed: ``close`` runs from the run's ``finally``, from atexit and on SIGTERM
  or SIGHUP (turned into ``SystemExit``; ignored while ``close`` runs, so a second signal
  cannot cut the clean-up short); names carry the driver's pid, and the next run removes what a
  killed run left (``netns.clean_stale``).
- The link is measured at the host end of the veth every ``SAMPLE`` s: the report gets the bytes
  each way and the downlink rate while the link was busy, next to the shaped rate.

    links = RealLinks.prepare(scenario)      # None without netns; raises NetnsUnavailable
    links.start(specs, broker_host, broker_port)
    try: ... links.broker_url(site), links.namespace(site) ...
    finally: links.close()
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from simulator import netns
from simulator.plan import DeviceSpec
from simulator.report import DeviceResult
from simulator.scenario import Scenario, Site
from simulator.wanproxy import DelayProxy

SAMPLE = 0.1  # seconds between byte-counter samples of each real link
BUSY = 0.25  # a sample counts as "link busy" above this share of the shaped rate
UNSHAPED_BUSY_BPS = 1_000_000  # the same for a link without a rate


def worker_main(ns: str, cfg: Any, outbox: Any, stop: Any, t0: Any) -> None:
    """A worker process inside namespace ``ns``: enter it, then run the ordinary worker."""
    from simulator import worker  # noqa: PLC0415 - the worker imports the agent

    try:
        netns.enter(ns)
    except OSError as e:
        outbox.put(("error", cfg.index, f"cannot enter network namespace {ns}: {e}"))
        return
    worker.main(cfg, outbox, stop, t0)


def unshaped(scenario: Scenario, site: str) -> Scenario:
    """``scenario`` with ``site``'s link model transparent (the kernel link shapes it)."""
    sites = tuple(dataclasses.replace(s, bandwidth=None, latency=0.0, loss=0.0, outages=())
                  if s.name == site else s for s in scenario.sites)
    return dataclasses.replace(scenario, sites=sites)


@dataclasses.dataclass
class _Site:
    site: Site
    devices: list[DeviceSpec]
    link: netns.ShapedLink
    proxy: DelayProxy
    samples: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)


class RealLinks:
    """The run's real links, one per site with ``netns`` devices (see module docstring)."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.sites: dict[str, _Site] = {}
        self.stale: list[str] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._prev_handlers: dict[int, Any] = {}
        self._closed = False

    @classmethod
    def prepare(cls, scenario: Scenario) -> RealLinks | None:
        """None when no site asks for real links; else checked for root and tools.

        Raises:
            NetnsUnavailable: not root, or ``ip``/``tc``/``iptables`` missing.
        """
        wanted = [s for s in scenario.sites if s.netns]
        if not wanted:
            return None
        netns.preflight(loss=any(s.loss > 0 for s in wanted))
        return cls(scenario)

    @staticmethod
    def placed(scenario: Scenario, specs: Sequence[DeviceSpec]) -> dict[str, list[DeviceSpec]]:
        """Site -> its devices on the real link (the first ``netns`` of the site, by index)."""
        return {s.name: [d for d in specs if d.site == s.name][: s.netns]
                for s in scenario.sites if s.netns}

    def start(self, specs: Sequence[DeviceSpec], broker_host: str, broker_port: int) -> None:
        """Make each site's namespace, shaped veth and relay; start measuring.

        Raises:
            SimError: a command failed or nothing listened (what was made is removed first).
        """
        atexit.register(self.close)
        self._set_handlers(_terminate)
        self.stale = netns.clean_stale()
        placed = self.placed(self.scenario, specs)
        addresses = netns.free_subnets(len(placed))
        for i, (name, devices) in enumerate(placed.items()):
            site = self.scenario.site(name)
            host_ip, ns_ip = addresses[i]
            veth = dataclasses.replace(netns.owned(os.getpid(), i), host_ip=host_ip, ns_ip=ns_ip)
            shape = netns.Shape(rate_bps=site.bandwidth, latency=site.latency, loss=site.loss,
                                uplink_loss=site.loss)
            link = netns.create(veth, shape)
            delay = site.latency if link.latency_by == "none" else 0.0
            proxy = DelayProxy(host_ip, (broker_host, broker_port), delay)
            # Registered before it starts: a relay that fails to start still gets its link removed.
            self.sites[name] = _Site(site, devices, link, proxy)
            proxy.start()
            if delay:
                link.latency_by = "relay"
        self._sampler = threading.Thread(target=self._sample, name="sim-netns-sample",
                                         daemon=True)
        self._sampler.start()

    def device_ids_of(self, specs: Sequence[DeviceSpec]) -> set[str]:
        """Ids of the devices of ``specs`` that run on a real link."""
        return {d.device_id for ds in self.placed(self.scenario, specs).values() for d in ds}

    def namespace(self, site: str) -> str:
        """The namespace of ``site``'s real link."""
        return self.sites[site].link.veth.ns

    def broker_url(self, site: str) -> str:
        """Where ``site``'s real-link devices find the broker (the relay on the host end)."""
        s = self.sites[site]
        return f"mqtt://{s.link.veth.host_ip}:{s.proxy.port}"

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE):
            now = time.monotonic()
            for s in self.sites.values():
                with contextlib.suppress(OSError):
                    rx, tx = netns.host_bytes(s.link.veth.host_if)
                    s.samples.append((now, rx, tx))

    def spawn(self, ctx: Any, *, first_index: int, scenario: Scenario, faults: dict[str, Any],
              device_root: Any, firmware: Any, channels: tuple[Any, Any, Any]) -> list[Any]:
        """Start one worker process per real link, inside its namespace; returns them.

        ``channels`` are the driver's (inbox, stop event, shared t0), as for every worker.
        """
        from simulator.worker import WorkerConfig  # noqa: PLC0415 - the worker imports the agent

        procs = []
        for i, (name, s) in enumerate(self.sites.items(), start=first_index):
            cfg = WorkerConfig(
                index=i, scenario=unshaped(scenario, name), devices=s.devices,
                faults={d.device_id: faults.get(d.device_id, []) for d in s.devices},
                broker_url=self.broker_url(name), work_dir=device_root / f"w{i}",
                firmware=firmware)
            p = ctx.Process(target=worker_main, args=(self.namespace(name), cfg, *channels),
                            name=f"sim-netns-{i}", daemon=True)
            p.start()
            procs.append(p)
        return procs

    def describe(self) -> str:
        """One line for the run's narration."""
        return "; ".join(
            f"{n}: {len(s.devices)} devices in {s.link.veth.ns} ({s.link.veth.ns_ip}), "
            f"latency by {s.link.latency_by}" for n, s in self.sites.items())

    def mark(self, devices: Sequence[DeviceResult]) -> list[DeviceResult]:
        """Device results with the real-link devices marked ``link="netns"``."""
        ids = {d.device_id for s in self.sites.values() for d in s.devices}
        return [dataclasses.replace(d, link="netns") if d.device_id in ids else d
                for d in devices]

    def report(self) -> list[dict[str, Any]]:
        """One entry per real link: its shape, how it was made, the bytes and the busy rate."""
        return [_figures(s) for s in self.sites.values()]

    def close(self) -> None:
        """Stop measuring, stop the relays, remove namespaces, veths and rules (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._set_handlers(signal.SIG_IGN)
        try:
            self._stop.set()
            if self._sampler is not None:
                self._sampler.join(2)
            for s in self.sites.values():
                s.proxy.stop()
                netns.destroy(s.link)
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)
        finally:
            self._set_handlers(None)

    def _set_handlers(self, handler: Any) -> None:
        """Install ``handler`` for SIGTERM and SIGHUP (None: put back what was there)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if handler is None:
                if sig in self._prev_handlers:
                    signal.signal(sig, self._prev_handlers.pop(sig))
            else:
                previous = signal.signal(sig, handler)
                # None: a handler not set from Python; the default is the honest way back.
                self._prev_handlers.setdefault(sig, signal.SIG_DFL if previous is None
                                               else previous)


def _terminate(signum: int, frame: Any) -> None:
    del frame
    # ``finally`` blocks run on SystemExit: the real links are removed on the way out.
    raise SystemExit(128 + signum)


def _figures(s: _Site) -> dict[str, Any]:
    rate = s.site.bandwidth
    threshold = (rate * BUSY if rate else UNSHAPED_BUSY_BPS) / 8  # bytes/s
    busy_s, busy_bytes = 0.0, 0
    for (t0, _, tx0), (t1, _, tx1) in zip(s.samples, s.samples[1:], strict=False):
        dt, moved = t1 - t0, tx1 - tx0
        if dt > 0 and moved / dt >= threshold:
            busy_s += dt
            busy_bytes += moved
    first, last = (s.samples[0], s.samples[-1]) if s.samples else ((0.0, 0, 0),) * 2
    throughput = busy_bytes * 8 / busy_s if busy_s else None
    v = s.link.veth
    return {
        "site": s.site.name,
        "namespace": v.ns,
        "devices": [d.device_id for d in s.devices],
        "host_ip": v.host_ip,
        "device_ip": v.ns_ip,
        "rate_bps": rate,
        "latency_s": s.site.latency,
        "loss": s.site.loss,
        "shaped_by": "htb" if rate else None,
        "latency_by": s.link.latency_by if s.site.latency else None,
        "loss_by": "iptables statistic, both ways" if s.site.loss else None,
        "relay_connections": s.proxy.connections,
        "downlink_bytes": last[2] - first[2],
        "uplink_bytes": last[1] - first[1],
        "busy_seconds": round(busy_s, 2),
        "busy_downlink_bytes": busy_bytes,
        "measured_bps": round(throughput) if throughput else None,
        "measured_vs_rate": round(throughput / rate, 3) if throughput and rate else None,
    }
