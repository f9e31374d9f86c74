"""One scenario run, end to end: world up, fleet up, rollout, faults, report.

The order (each step has a deadline; a step that cannot reach what it needs raises
``Unreachable`` within ``connect_timeout`` seconds, never hangs):

1. broker (given or started) and the real controller (service + MQTT gateway + scheduler);
   a relay site's own Mosquitto, bridged to that broker (``simulator/siterelay.py``);
2. firmware: keys, trust root, the two images and their signed bundles; the release uploaded;
3. sites and devices registered with the controller (real enrollment: token, CSR, certificate);
4. device worker processes (``simulator/worker.py``) boot every virtual device and connect it;
5. the rollout is created and started exactly as an operator would; system faults (broker or
   controller restart) fire at their times; the live view shows groups, phases and links;
6. the run ends when the rollout is finished, paused or stopped and no device is busy (or at the
   scenario's timeout); workers report each device's outcome from its own journal and boot env;
7. the report (JSON) is written and the expectations are checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import queue
import resource
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_bundles.protocol import relay_id
from simulator import plan, report, siterelay
from simulator.env import Broker, Controller
from simulator.errors import SimError
from simulator.scenario import FaultKind, Scenario

SETTLE = 1.5  # seconds with no busy device after the rollout stopped moving


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what: that is the scenario)."""

    broker_url: str | None = None
    database_url: str | None = None
    processes: int = 1
    work_dir: Path | None = None
    report_path: Path | None = None
    connect_timeout: float = 5.0
    progress: bool = True
    api_port: int | None = None  # serve the controller's HTTP API on this port during the run
    narrate: Callable[[str, str], None] | None = None  # (step, detail) as the run goes
    measure_broker: Callable[[str], float] | None = None  # bench: raw rate, same broker
    real_links: Any = None  # set by run(): the scenario's netns links (simulator/netns_site.py)


@dataclass
class _Live:
    """What the driver knows while the run goes on (fed by worker messages)."""

    phases: dict[int, Counter[str]] = field(default_factory=dict)
    busy: dict[int, int] = field(default_factory=dict)
    sites: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)
    messages: dict[int, int] = field(default_factory=dict)
    ready: set[int] = field(default_factory=set)
    results: dict[int, list[report.DeviceResult]] = field(default_factory=dict)
    rss: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def phase_counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.phases.values():
            total.update(c)
        return total

    def site_totals(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = {}
        for per_worker in self.sites.values():
            for name, stats in per_worker.items():
                out.setdefault(name, Counter()).update(stats)
        return {k: dict(v) for k, v in out.items()}


def run_and_report(scenario: Scenario, options: RunOptions) -> bool:
    """Run, print the summary tables, write the report; True when every check held."""
    from rich.console import Console  # noqa: PLC0415

    console = Console()
    result, checks, path = run(scenario, options, console=console)
    for table in report.summary(result, checks):
        console.print(table)
    ok = all(c.ok for c in checks)
    verdict = "[green]all promises held[/]" if ok else "[red]some promises did not hold[/]"
    console.print(f"{verdict}  ({result.wall_seconds:.1f} s, report: {path})")
    return ok


def run(scenario: Scenario, options: RunOptions, *, console: Any = None,
        on_ready: Any = None,
        keep_running: bool = False) -> tuple[report.RunResult, list[report.Check], Path]:
    """Run ``scenario``; returns the result, the checks and the report path.

    With ``keep_running`` the controller (and its API) stays up; ``on_ready`` received it and
    the caller stops it.

    Raises:
        Unreachable: the broker or the controller did not answer in time.
        SimError: a worker failed to start its devices.
    """
    from simulator.netns_site import RealLinks  # noqa: PLC0415 - only runs with netns use it

    # Before anything is made: a run that needs root and tc says so at once.
    real = RealLinks.prepare(scenario)
    options = dataclasses.replace(options, real_links=real)
    own_dir = options.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="slotline-sim-")) if options.work_dir is None else Path(
        options.work_dir)
    work = work.resolve()
    _fresh_work_dir(work)
    report_path = options.report_path or work / "report.json"
    if own_dir and options.report_path is None:
        report_path = Path.cwd() / f"slotline-sim-{scenario.meta.name}.json"
    started = time.monotonic()
    say = options.narrate or (lambda _step, _detail: None)
    broker = Broker(options.broker_url, work, options.connect_timeout)
    say("broker", f"{broker.kind} at {broker.url}")
    controller: Controller | None = None
    site_brokers: dict[str, Any] = {}
    workers: list[Any] = []
    stop = mp.get_context("spawn").Event()
    try:
        for f in scenario.faults:
            if f.kind is FaultKind.BROKER_RESTART and not broker.restartable:
                raise SimError("a broker_restart fault needs the run's own broker: drop --broker")
        db = options.database_url or f"sqlite:///{work / 'controller.db'}"
        controller = Controller(db, work / "controller", broker.url,
                                connect_timeout=options.connect_timeout)
        api = controller.serve_api(options.api_port) if options.api_port else None
        say("controller", f"{_redacted(db)}" + (f", API {api}/docs" if api else ""))
        from simulator import firmware  # noqa: PLC0415 - heavy (crypto, codec)

        fw = firmware.prepare(scenario, work / "firmware", controller)
        say("firmware", f"{scenario.firmware.from_version} -> {scenario.firmware.to_version}: "
            f"{scenario.firmware.image_size // 1024} KiB images, {scenario.firmware.payload} "
            f"bundle of {fw.bundle_bytes // 1024} KiB, signed and uploaded "
            f"({fw.build_seconds:.1f} s)")
        # On a broker others use, tag the ids: retained state from earlier runs is not ours.
        run_tag = "" if broker.restartable else f"r{uuid.uuid4().hex[:5]}"
        specs = plan.fleet_specs(scenario, run_tag)
        t_enroll = time.monotonic()
        firmware.register_fleet(scenario, specs, controller)
        say("fleet", f"{len(specs)} devices enrolled at {len(scenario.sites)} sites "
            f"({time.monotonic() - t_enroll:.1f} s)")
        site_brokers.update(siterelay.start_site_brokers(
            scenario, broker.host, broker.port, work, controller.run_tag))
        for name, b in site_brokers.items():
            say("relay", f"site {name}: site broker {b.url} bridged to {broker.url}, "
                f"relay {relay_id(name)}")
        result = _drive(scenario, options, work, broker, controller, fw, specs, workers, stop,
                        console, on_ready, {k: b.url for k, b in site_brokers.items()})
        result.wall_seconds = time.monotonic() - started
        if api:
            result.endpoints["api"] = f"{api}/docs"
    finally:
        stop.set()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
        if controller is not None and not keep_running:
            controller.stop()
        for b in site_brokers.values():
            b.stop()
        broker.stop()
        devices_link = work / "devices"
        if devices_link.is_symlink():
            # Device files in RAM never outlive the run (the report has every outcome).
            shutil.rmtree(devices_link.resolve(), ignore_errors=True)
            devices_link.unlink()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
        if real is not None:
            real.close()
    if real is not None:
        result.devices = real.mark(result.devices)
        result.real_links = real.report()
    checks = report.check(result)
    report.write(report_path, report.to_json(result, checks))
    return result, checks, report_path


def _drive(  # noqa: PLR0917 - one call site, the steps of run()
    scenario: Scenario, options: RunOptions, work: Path, broker: Broker,
    controller: Controller, fw: Any, specs: list[plan.DeviceSpec], workers: list[Any],
    stop: Any, console: Any, on_ready: Any, site_urls: dict[str, str],
) -> report.RunResult:
    from simulator import worker as worker_mod  # noqa: PLC0415
    from simulator.firmware import start_rollout  # noqa: PLC0415

    ctx = mp.get_context("spawn")
    inbox: Any = ctx.Queue()
    device_root, fw_dev = _device_root(work, fw.for_devices(), len(specs))
    faults = plan.assign_faults(scenario, specs)
    real = options.real_links
    on_real = real.device_ids_of(specs) if real is not None else set()
    shards = worker_mod.shard_by_site(scenario, [d for d in specs if d.device_id not in on_real],
                                      options.processes)
    t0 = time.time() + 3600.0  # replaced once the rollout starts; links idle until then
    t0_shared = ctx.Value("d", t0)
    for i, shard in enumerate(shards):
        cfg = worker_mod.WorkerConfig(
            index=i, scenario=scenario, devices=shard,
            faults={d.device_id: faults.get(d.device_id, []) for d in shard},
            broker_url=broker.url, work_dir=device_root / f"w{i}", firmware=fw_dev,
            site_brokers=site_urls,
        )
        p = ctx.Process(target=worker_mod.main, args=(cfg, inbox, stop, t0_shared),
                        name=f"sim-worker-{i}", daemon=True)
        p.start()
        workers.append(p)
    if real is not None:
        real.start(specs, broker.host, broker.port)
        (options.narrate or (lambda _s, _d: None))("real links", real.describe())
        workers.extend(real.spawn(ctx, first_index=len(workers), scenario=scenario,
                                  faults=faults, device_root=device_root, firmware=fw_dev,
                                  channels=(inbox, stop, t0_shared)))
    live = _Live()
    boot_started = time.monotonic()
    deadline = boot_started + 60 + len(specs) * 0.05 + options.connect_timeout
    while len(live.ready) < len(workers):
        _drain(inbox, live, 0.2)
        if live.errors:
            raise SimError(f"device worker failed: {live.errors[0]}")
        if any(not w.is_alive() for w in workers) and len(live.ready) < len(workers):
            _drain(inbox, live, 0.5)
            raise SimError("a device worker exited before its devices were up: "
                           + (live.errors[0] if live.errors else "no message"))
        if time.monotonic() > deadline:
            up = sum(sum(c.values()) - c.get("booting", 0) for c in live.phases.values())
            raise SimError(f"devices did not all come up in time ({up} of {len(specs)} "
                           f"running after {time.monotonic() - boot_started:.0f} s)")
    _wait_reported(controller, len(specs), deadline=time.monotonic() + 30 + len(specs) * 0.005)
    (options.narrate or (lambda _s, _d: None))(
        "devices", f"{len(specs)} virtual devices booted and connected "
        f"in {len(workers)} worker process{'es' if len(workers) > 1 else ''} "
        f"({time.monotonic() - boot_started:.1f} s)")
    if on_ready is not None:
        on_ready(controller)
    # Devices are up and connected: start the clock the links and faults run on.
    with t0_shared.get_lock():
        t0_shared.value = time.time() + scenario.rollout.start_after
    rollout_id = start_rollout(scenario, specs, controller, fw)
    timeline: list[dict[str, Any]] = [{"t": 0.0, "what": "rollout started", "id": rollout_id}]
    system_faults = sorted((f for f in scenario.faults
                            if f.kind in (FaultKind.BROKER_RESTART, FaultKind.CONTROLLER_RESTART)),
                           key=lambda f: f.at)
    run_start = time.monotonic()
    calm_since: float | None = None
    status: dict[str, Any] = {}
    view = _progress_view(console, scenario, len(specs)) if options.progress and console else None
    try:
        while True:
            _drain(inbox, live, 0.25)
            if live.errors:
                raise SimError(f"device worker failed: {live.errors[0]}")
            elapsed = time.monotonic() - run_start
            while system_faults and system_faults[0].at <= elapsed:
                f = system_faults.pop(0)
                timeline.append({"t": round(elapsed, 2), "what": f.kind.value,
                                 "down_for": f.duration})
                if f.kind is FaultKind.BROKER_RESTART:
                    broker.restart(f.duration)
                else:
                    controller.restart(f.duration)
            with contextlib.suppress(Exception):
                status = controller.call(lambda s: s.scheduler.status(rollout_id))
            busy = sum(live.busy.values())
            state = status.get("state", "running")
            if view is not None:
                view.update(_render(scenario, status, live, elapsed, len(specs)))
            settled = state in ("finished", "paused", "stopped") and busy == 0
            calm_since = (calm_since or time.monotonic()) if settled else None
            if calm_since is not None and time.monotonic() - calm_since >= SETTLE:
                break
            if elapsed > scenario.meta.timeout:
                timeline.append({"t": round(elapsed, 2), "what": "timeout"})
                break
    finally:
        if view is not None:
            view.stop()
    rollout_seconds = time.monotonic() - run_start
    timeline.append({"t": round(rollout_seconds, 2), "what": f"rollout {status.get('state')}"})
    timeline.extend({"t": None, "what": f"controller: {d['action']}", "detail": d["detail"]}
                    for d in status.get("decisions", [])[::-1])
    stop.set()
    raw_rate = options.measure_broker(broker.url) if options.measure_broker else None
    deadline = time.monotonic() + 30
    while len(live.results) < len(workers) and time.monotonic() < deadline and not live.errors:
        _drain(inbox, live, 0.25)
    devices = [r for i in sorted(live.results) for r in live.results[i]]
    if len(live.results) < len(workers):
        raise SimError("a device worker did not report its devices' outcomes"
                       + (f": {live.errors[0]}" if live.errors else ""))
    site_totals = live.site_totals()
    sites = []
    for s in scenario.sites:
        st = site_totals.get(s.name, {})
        sites.append(report.SiteResult(
            name=s.name, devices=sum(1 for d in specs if d.site == s.name),
            wan_bytes=st.get("wan_bytes", 0), wan_chunk_bytes=st.get("wan_chunk_bytes", 0),
            lan_bytes=st.get("lan_bytes", 0),
            wan_messages=st.get("wan_messages", 0), dropped_messages=st.get("dropped_messages", 0),
            retransmits=st.get("retransmits", 0), relay_hits=st.get("relay_hits", 0),
            relay_wan_chunks=st.get("relay_wan_chunks", 0),
            relay_wan_errors=st.get("relay_wan_errors", 0),
            metered=s.metered, relay=s.relay))
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report.RunResult(
        scenario=scenario, devices=devices, sites=sites,
        rollout_state=status.get("state", "unknown"), rollout_reason=status.get("reason") or None,
        bundle_bytes=fw.bundle_bytes, messages=sum(live.messages.values()),
        processes=len(workers), peak_rss_bytes=own_rss + sum(live.rss.values()),
        worker_rss_bytes=sum(live.rss.values()), rollout_seconds=rollout_seconds,
        raw_broker_rate=raw_rate,
        endpoints={"broker": broker.url, "broker_kind": broker.kind,
                   "database": _redacted(controller.database_url)},
        timeline=timeline,
        notes=[f"controller restarts: {controller.restarts}",
               f"controller tick errors: {controller.tick_errors}",
               *_gateway_notes(controller)],
    )


def _device_root(work: Path, fw: Any, devices: int) -> tuple[Path, Any]:
    """Where device slots and journals live: RAM (``/dev/shm``) when it has room, else ``work``.

    Thousands of agents fsync their journals and boot envs; on a disk those fsyncs serialise and
    measure the disk, not Slotline. Durability under power loss is modelled by ``FaultFS`` for
    the devices that get a power cut, whatever the medium.
    """
    import dataclasses  # noqa: PLC0415
    import os  # noqa: PLC0415

    shm = Path("/dev/shm")  # noqa: S108 - the standard Linux RAM file system, not a temp file
    need = devices * (fw.image_size + 64 * 1024) + fw.image_size
    try:
        free = shutil.disk_usage(shm).free if shm.is_dir() and os.access(shm, os.W_OK) else 0
    except OSError:
        free = 0
    if free < 2 * need:
        return work / "devices", fw
    root = Path(tempfile.mkdtemp(prefix="slotline-sim-", dir=shm))
    (work / "devices").symlink_to(root)
    base = root / "factory.img"
    shutil.copyfile(fw.base_image, base)  # hard links need the same file system
    return root, dataclasses.replace(fw, base_image=str(base))


def _wait_reported(controller: Controller, total: int, deadline: float) -> None:
    """Wait until the controller knows every device's active image (its first state report).

    An operator starts a rollout on a fleet that has reported in; the controller picks each
    device's payload (delta for its base) from that report.
    """
    from sqlalchemy import func, select  # noqa: PLC0415

    from controller.db import models as m  # noqa: PLC0415

    while time.monotonic() < deadline:
        svc = controller.service
        with contextlib.suppress(Exception):
            svc.drain_reports()
        with svc.sessions() as s:
            known = s.scalar(select(func.count()).select_from(m.Device)
                             .where(m.Device.active_digest.is_not(None))) or 0
        if known >= total:
            return
        time.sleep(0.2)
    raise SimError(f"only {known} of {total} devices reported their state to the controller")


def _gateway_notes(controller: Controller) -> list[str]:
    """What the controller's gateway dropped or received (diagnosis of lost reports)."""
    try:
        stats = controller.gateway.stats
        drops = dict(stats.drops.counts)
        serving = controller.gateway.serving_stats
        return [f"gateway received: {dict(stats.received)}", f"gateway drops: {drops}",
                f"gateway inbox errors: {stats.inbox_errors}",
                (f"chunk server: requests {serving.requests}, served {serving.served} "
                f"({serving.served_bytes} B), not found {serving.not_found}, "
                f"drops {dict(serving.drops.counts)}")]
    except Exception as e:  # diagnostics must never fail a run
        return [f"gateway stats unavailable: {e}"]


MARKER = ".slotline-sim"


def _fresh_work_dir(work: Path) -> None:
    """An empty work dir; one a previous run left (it has our marker) is emptied first."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SimError(f"work dir {work} is not empty and was not made by a previous run")
        for child in work.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by slotline sim; emptied by the next run\n")


def _redacted(url: str) -> str:
    from simulator.env import _redact  # noqa: PLC0415

    return _redact(url)


def _drain(inbox: Any, live: _Live, wait: float) -> None:
    end = time.monotonic() + wait
    while True:
        timeout = end - time.monotonic()
        try:
            msg = inbox.get(timeout=max(0.0, timeout)) if timeout > 0 else inbox.get_nowait()
        except queue.Empty:
            return
        kind, idx = msg[0], msg[1]
        if kind == "ready":
            live.ready.add(idx)
        elif kind == "progress":
            _, _, phases, busy, sites, messages, rss = msg
            live.phases[idx], live.busy[idx], live.sites[idx] = Counter(phases), busy, sites
            live.messages[idx], live.rss[idx] = messages, rss
        elif kind == "result":
            live.results[idx] = msg[2]
            live.sites[idx], live.messages[idx], live.rss[idx] = msg[3], msg[4], msg[5]
            live.busy[idx] = 0
        elif kind == "error":
            live.errors.append(msg[2])


# ----------------------------------------------------------------------------- live view


class _View:
    def __init__(self, live: Any) -> None:
        self._live = live

    def update(self, renderable: Any) -> None:
        self._live.update(renderable, refresh=True)

    def stop(self) -> None:
        self._live.stop()


def _progress_view(console: Any, scenario: Scenario, total: int) -> _View:
    from rich.live import Live  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    live = Live(Text(f"{scenario.meta.name}: starting {total} devices"), console=console,
                refresh_per_second=4, transient=False)
    live.start()
    return _View(live)


def _bar(done: int, total: int, width: int = 24) -> str:
    if total <= 0:
        return " " * width
    filled = round(width * done / total)
    return "█" * filled + "░" * (width - filled)


def _render(scenario: Scenario, status: dict[str, Any], live: _Live, elapsed: float,
            total: int) -> Any:
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    from simulator.units import format_bytes  # noqa: PLC0415

    state = status.get("state", "starting")
    head = Text.assemble(
        (f"{scenario.meta.name}", "bold"), f"  rollout {status.get('name', '')}: ",
        (state, {"running": "cyan", "finished": "green", "paused": "yellow",
                 "stopped": "red"}.get(state, "white")),
        f"  {elapsed:5.1f} s  {total} devices",
    )
    if status.get("reason"):
        head.append(f"\n  reason: {status['reason']}", style="yellow")
    groups = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    for col in ("group", "state", "progress", "ok", "failed", "in flight", "total"):
        groups.add_column(col, justify="left" if col in ("group", "state", "progress") else "right")
    for g in status.get("groups", []):
        c = g.get("counts", {})
        ok = c.get("succeeded", 0)
        failed = sum(v for k, v in c.items() if k in ("failed", "reverted", "rejected"))
        flight = sum(v for k, v in c.items() if k in ("commanded", "downloading", "installing",
                                                     "in_progress", "cancel_sent"))
        groups.add_row(g["name"], g["state"], _bar(ok + failed, g["total"]), str(ok),
                       str(failed), str(flight), str(g["total"]))
    phases = live.phase_counts()
    phase_line = Text("devices: ", style="dim")
    for name, n in sorted(phases.items(), key=lambda kv: -kv[1]):
        phase_line.append(f"{name} {n}  ")
    sites = Table(box=None, pad_edge=False, header_style="dim")
    for col in ("site", "link", "WAN", "drops"):
        sites.add_column(col, justify="left" if col in ("site", "link") else "right")
    totals = live.site_totals()
    for s in scenario.sites:
        st = totals.get(s.name, {})
        link = (f"{s.bandwidth / 1e6:g} Mbit/s" if s.bandwidth else "LAN") + (
            " relay" if s.relay else "") + (" metered" if s.metered else "")
        sites.add_row(s.name, link, format_bytes(st.get("wan_bytes", 0)),
                      str(st.get("dropped_messages", 0)))
    return Group(head, groups, phase_line, sites)
