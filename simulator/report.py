"""The run report: per-device outcomes, per-site link figures, expectations checked.

Rules:
- ``RunResult`` is plain data collected by the fleet driver; ``check`` compares it with the
  scenario's ``[expect]`` and returns one ``Check`` per promise (``bricked`` always included);
  ``to_json`` is the machine-readable report; ``summary`` renders the operator's tables.
- A device's outcome is decided by the driver from the device's own journal and boot env after
  the run, never from what the controller believes: the report is the fleet's word.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulator.scenario import Outcome, Scenario, Selector
from simulator.units import format_bytes


@dataclass(frozen=True)
class DeviceResult:
    """How one virtual device ended."""

    device_id: str
    hardware: str
    site: str
    tags: tuple[str, ...]
    outcome: Outcome
    version: str | None  # version in the slot that boots next
    error: str | None = None  # last stable error code the device reported
    message: str | None = None  # and its one-line message
    faults: tuple[str, ...] = ()
    boots: int = 0
    power_cuts: int = 0
    finished_at: float | None = None  # run seconds when it reached its final state
    link: str = "model"  # "netns": behind a real shaped link (simulator/netns_site.py)


@dataclass
class SiteResult:
    """One site's link figures."""

    name: str
    devices: int
    wan_bytes: int = 0
    wan_chunk_bytes: int = 0  # at a relay site: what the real relay fetched upstream
    lan_bytes: int = 0  # chunks the relay served the site's devices (their WAN bill without it)
    wan_messages: int = 0
    dropped_messages: int = 0
    retransmits: int = 0
    relay_hits: int = 0  # chunks the relay served from its cache (or from a fetch in flight)
    relay_wan_chunks: int = 0
    relay_wan_errors: int = 0
    metered: bool = False
    relay: bool = False

    def relay_saved(self) -> int:
        """Bytes the relay kept off the WAN: served to devices minus fetched upstream."""
        return max(0, self.lan_bytes - self.wan_chunk_bytes) if self.relay else 0


@dataclass
class RunResult:
    """Everything the driver measured in one run."""

    scenario: Scenario
    devices: list[DeviceResult]
    sites: list[SiteResult]
    rollout_state: str
    rollout_reason: str | None = None
    wall_seconds: float = 0.0
    bundle_bytes: int = 0  # size of the payload one device downloads
    messages: int = 0  # MQTT messages the devices sent and received
    processes: int = 1
    peak_rss_bytes: int = 0
    worker_rss_bytes: int = 0  # peak RSS summed over device worker processes
    rollout_seconds: float = 0.0  # rollout start to settled (or timeout)
    raw_broker_rate: float | None = None  # bench: raw broker msgs/s measured in the same run
    endpoints: dict[str, str] = field(default_factory=dict)  # broker, controller, dashboard
    timeline: list[dict[str, Any]] = field(default_factory=list)  # rollout decisions, faults
    notes: list[str] = field(default_factory=list)
    real_links: list[dict[str, Any]] = field(default_factory=list)  # netns links, measured


@dataclass(frozen=True)
class Check:
    """One promise, kept or not."""

    name: str
    ok: bool
    detail: str


def _matches(sel: Selector, d: DeviceResult) -> bool:
    return sel.matches(d.hardware, d.site, frozenset(d.tags))


def counts(devices: Iterable[DeviceResult]) -> Counter[Outcome]:
    """Outcome -> number of devices."""
    return Counter(d.outcome for d in devices)


def check(result: RunResult) -> list[Check]:
    """Compare a run with its scenario's ``[expect]`` table."""
    e = result.scenario.expect
    c = counts(result.devices)
    out = [Check("no device bricked", c[Outcome.BRICKED] <= e.bricked_max,
                 f"{c[Outcome.BRICKED]} bricked (allowed {e.bricked_max})")]
    if e.rollout is not None:
        out.append(Check(f"rollout ends {e.rollout.value}", result.rollout_state == e.rollout.value,
                         f"rollout is {result.rollout_state}"
                         + (f" ({result.rollout_reason})" if result.rollout_reason else "")))
    for label, have, lo, hi in (
        ("committed", c[Outcome.COMMITTED], e.committed_min, e.committed_max),
        ("reverted", c[Outcome.REVERTED], e.reverted_min, e.reverted_max),
    ):
        if lo is not None:
            out.append(Check(f"at least {lo} {label}", have >= lo, f"{have} {label}"))
        if hi is not None:
            out.append(Check(f"at most {hi} {label}", have <= hi, f"{have} {label}"))
    if e.pending_max is not None:
        have = c[Outcome.PENDING]
        out.append(Check(f"at most {e.pending_max} still mid-update", have <= e.pending_max,
                         f"{have} pending"))
    for de in e.devices:
        chosen = [d for d in result.devices if _matches(de.select, d)]
        # Devices never commanded (the rollout stopped first) are not held to the expectation.
        judged = [d for d in chosen if d.outcome is not Outcome.UNTOUCHED
                  or de.outcome is Outcome.UNTOUCHED]
        bad = [d for d in judged if d.outcome is not de.outcome
               or (de.version is not None and d.version != de.version)
               or (de.error is not None and not (d.error or "").startswith(de.error))]
        what = _describe(de.select)
        name = f"{what}: {de.outcome.value}" + (f" on {de.version}" if de.version else "")
        if de.error:
            name += f" with {de.error}"
        if not judged:
            out.append(Check(name, ok=False, detail=f"no device of {what} was commanded"))
            continue
        detail = f"{len(judged) - len(bad)}/{len(judged)} as expected"
        if bad:
            b = bad[0]
            detail += (f"; e.g. {b.device_id}: {b.outcome.value} on {b.version}"
                       + (f" ({b.error})" if b.error else ""))
        out.append(Check(name, not bad, detail))
    for se in e.sites:
        site = next((s for s in result.sites if s.name == se.name), None)
        wan = site.wan_chunk_bytes if site else 0
        ratio = wan / result.bundle_bytes if result.bundle_bytes else 0.0
        detail = (f"{format_bytes(wan)} of bundle chunks = {ratio:.2f}x the bundle "
                  f"(all WAN traffic: {format_bytes(site.wan_bytes if site else 0)})")
        out.append(Check(f"site {se.name}: bundle bytes over WAN <= {se.wan_ratio_max}x bundle",
                         ratio <= se.wan_ratio_max, detail))
    return out


def _describe(sel: Selector) -> str:
    parts = [*sel.hardware, *(f"site {s}" for s in sel.sites), *(f"#{t}" for t in sel.tags)]
    return " ".join(parts) or "all devices"


def to_json(result: RunResult, checks: list[Check]) -> dict[str, Any]:
    """The JSON report (stable keys; ``schema`` bumps on incompatible change)."""
    from simulator.scenario import to_json as scenario_json  # noqa: PLC0415 - avoid a cycle

    c = counts(result.devices)
    return {
        "schema": 1,
        "scenario": scenario_json(result.scenario),
        "ok": all(x.ok for x in checks),
        "wall_seconds": round(result.wall_seconds, 3),
        "processes": result.processes,
        "peak_rss_bytes": result.peak_rss_bytes,
        "worker_rss_bytes": result.worker_rss_bytes,
        "rollout_seconds": round(result.rollout_seconds, 3),
        "messages": result.messages,
        "bundle_bytes": result.bundle_bytes,
        "rollout": {"state": result.rollout_state, "reason": result.rollout_reason},
        "outcomes": {o.value: c[o] for o in Outcome},
        "by_hardware": _by(result.devices, "hardware"),
        "by_site": _by(result.devices, "site"),
        "sites": [asdict(s) for s in result.sites],
        "checks": [asdict(x) for x in checks],
        "endpoints": result.endpoints,
        "timeline": result.timeline,
        "notes": result.notes,
        "real_links": result.real_links,
        "devices": [
            {**asdict(d), "outcome": d.outcome.value, "tags": list(d.tags),
             "faults": list(d.faults)}
            for d in result.devices
        ],
    }


def _by(devices: Iterable[DeviceResult], attr: str) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for d in devices:
        out.setdefault(getattr(d, attr), Counter())[d.outcome.value] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def write(path: Path, doc: Mapping[str, Any]) -> None:
    """Write the JSON report (pretty, for humans reading it too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def summary(result: RunResult, checks: list[Check]) -> list[Any]:
    """Rich renderables: outcomes by hardware model, sites, and the checks."""
    from rich.table import Table  # noqa: PLC0415 - rich is imported only when rendering

    outcomes = [o for o in Outcome if any(d.outcome is o for d in result.devices)]
    by_hw = Table(title="Devices by hardware model", title_justify="left")
    by_hw.add_column("hardware")
    for o in outcomes:
        by_hw.add_column(o.value, justify="right",
                         style="red" if o is Outcome.BRICKED else None)
    by_hw.add_column("total", justify="right")
    for hw, row in _by(result.devices, "hardware").items():
        by_hw.add_row(hw, *(str(row.get(o.value, 0)) for o in outcomes), str(sum(row.values())))

    sites = Table(title="Sites (bytes over each site's WAN link)", title_justify="left")
    for col in ("site", "devices", "all traffic", "bundle chunks", "vs bundle", "notes"):
        sites.add_column(col, justify="left" if col in ("site", "notes") else "right")
    for s in result.sites:
        ratio = s.wan_chunk_bytes / result.bundle_bytes if result.bundle_bytes else 0
        relay = ""
        if s.relay:
            served = s.lan_bytes / result.bundle_bytes if result.bundle_bytes else 0
            relay = (f"relay: {s.relay_wan_chunks} WAN fetches, {s.relay_hits} cache hits, "
                     f"{served:.1f}x bundle to devices")
        notes = ", ".join(x for x in ("metered" if s.metered else "", relay,
                                      f"{s.dropped_messages} lost" if s.dropped_messages else "")
                          if x)
        sites.add_row(s.name, str(s.devices), format_bytes(s.wan_bytes),
                      format_bytes(s.wan_chunk_bytes), f"{ratio:.1f}x", notes)

    promises = Table(title="Checks", title_justify="left")
    promises.add_column("")
    promises.add_column("promise")
    promises.add_column("measured")
    for x in checks:
        promises.add_row("[green]ok[/]" if x.ok else "[red]FAIL[/]", x.name, x.detail)
    if result.real_links:
        return [by_hw, sites, _real_links(result.real_links), promises]
    return [by_hw, sites, promises]


def _real_links(links: list[dict[str, Any]]) -> Any:
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="Real links (network namespaces, tc)", title_justify="left")
    for col in ("site", "dev", "link (delay by)", "down", "busy", "measured"):
        table.add_column(col, justify="left" if col in ("site", "link (delay by)") else "right")
    for x in links:
        rate = f"{x['rate_bps'] / 1e6:g}Mbit/s" if x["rate_bps"] else "no limit"
        delay = f"{x['latency_s'] * 1000:g}ms" + (f" ({x['latency_by']})" if x["latency_by"]
                                                  else "")
        measured = (f"{x['measured_bps'] / 1e6:.2f}Mbit/s" if x["measured_bps"] else "-") + (
            f" {x['measured_vs_rate']:.2f}x" if x["measured_vs_rate"] else "")
        table.add_row(x["site"], str(len(x["devices"])), f"{rate} {delay} {x['loss'] * 100:g}%",
                      format_bytes(x["downlink_bytes"]), f"{x['busy_seconds']:g}s", measured)
    return table
