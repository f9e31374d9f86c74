"""A device worker: many virtual devices on one asyncio loop in one process.

A virtual device is the real agent (``agent.runtime.Agent``) with:
- file slots (``FileSlots``): slot A is a hard link to the run's factory image (the active slot
  is never written, so sharing it is safe and costs no disk), slot B a sparse file;
- the U-Boot redundant env in a file and the agent's ``SimBootloader`` deciding what boots;
- its journal in a file (``FileJournal``);
- the agent's MQTT transport, seen through its site's ``Link`` (``LinkedTransport``); at a relay
  site it connects to the site broker and fetches chunks from the site's real ``SiteRelay``,
  which this worker runs on the same loop (``simulator/siterelay.py``);
- the agent's ``SelfTestRunner`` with a ``file`` check (present unless the scenario makes the
  booted version fail on this hardware), a ``command`` check that hangs for a hang fault, and
  the ``controller`` reachability check.
Devices with a power-cut, disk-full or I/O-error fault run on the agent's ``FaultFS`` instead of
real files (its durability rules decide what survives a cut).

A reboot (``Reboot`` command, power cut) ends the agent object; the device then boots again
through the bootloader against the same files: exactly what a real device does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulator import siterelay
from simulator.firmware import DeviceFirmware
from simulator.link import Link, LinkProfile, Window
from simulator.plan import DeviceSpec
from simulator.report import DeviceResult
from simulator.scenario import Fault, FaultKind, Outcome, Scenario

if TYPE_CHECKING:
    from agent.transport.relay import SiteRelay

PROGRESS_EVERY = 0.5
BOOT_DELAY = 0.05  # seconds a virtual boot takes (keeps reboot loops visible, not busy)


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker runs (picklable)."""

    index: int
    scenario: Scenario
    devices: list[DeviceSpec]
    faults: dict[str, list[Fault]]
    broker_url: str
    work_dir: Path
    firmware: DeviceFirmware
    site_brokers: dict[str, str] = field(default_factory=dict)  # relay site -> its broker URL


def shard_by_site(scenario: Scenario, specs: Sequence[DeviceSpec],
                  n: int) -> list[list[DeviceSpec]]:
    """Split devices over ``n`` workers; a bandwidth-limited or relay site stays in one worker.

    A site's link is one queue; split over processes it would carry more than its bandwidth. A
    relay site has one relay, run by the worker of its devices.
    """
    shards: list[list[DeviceSpec]] = [[] for _ in range(n)]
    limited = {s.name for s in scenario.sites
               if s.bandwidth is not None or s.outages or s.relay}
    flap = {f.site for f in scenario.faults if f.kind is FaultKind.LINK_FLAP}
    whole = limited | flap
    for site in sorted(whole, key=lambda s: -sum(1 for d in specs if d.site == s)):
        target = min(range(n), key=lambda i: len(shards[i]))
        shards[target].extend(d for d in specs if d.site == site)
    rest = [d for d in specs if d.site not in whole]
    for d in rest:
        target = min(range(n), key=lambda i: len(shards[i]))
        shards[target].append(d)
    return [s for s in shards if s] or [[]]


class _FullDisk:
    """A file system (``agent.adapters.fs.FileSystem``) whose disk fills up under one file.

    ``FaultFS.no_space_after`` counts only growth, and slots are pre-sized sparse files, so the
    disk-full event is modelled here: writes to ``path`` past ``limit`` bytes fail with ENOSPC.
    """

    def __init__(self, inner: Any, path: str, limit: int) -> None:
        self._inner, self._path, self._limit = inner, path, limit
        self._paths: dict[int, str] = {}
        self.written = 0

    def open(self, path: str, *, write: bool, create: bool = False) -> int:
        handle: int = self._inner.open(path, write=write, create=create)
        self._paths[handle] = path
        return handle

    def pwrite(self, handle: int, offset: int, data: bytes) -> None:
        if self._paths.get(handle) == self._path:
            if self.written + len(data) > self._limit:
                import errno  # noqa: PLC0415

                raise OSError(errno.ENOSPC, "no space left on device", self._path)
            self.written += len(data)
        self._inner.pwrite(handle, offset, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Clock:
    """``agent.ports.Clock`` with an optional skew on wall time (the clock_skew fault)."""

    def __init__(self, skew: float = 0.0) -> None:
        self.skew = skew

    def now(self) -> float:
        return time.time() + self.skew

    def monotonic(self) -> float:
        return time.monotonic()


class _Power:
    """``Power`` port: a reboot request just ends the agent; the device loop boots it again."""

    def __init__(self) -> None:
        self.requests = 0

    async def reboot(self) -> None:
        self.requests += 1


@dataclass
class _DeviceStats:
    boots: int = 0
    power_cuts: int = 0
    commanded: bool = False
    finished_at: float | None = None
    error: str | None = None


@dataclass
class VirtualDevice:
    """One virtual device (see module docstring)."""

    spec: DeviceSpec
    faults: list[Fault]
    directory: Path
    fw: DeviceFirmware
    broker_url: str
    link: Link
    elapsed: Any
    seed: int
    behind_relay: bool = False  # chunks from the site relay over the LAN
    stats: _DeviceStats = field(default_factory=_DeviceStats)
    agent: Any = None
    transport: Any = None
    fs: Any = None
    phase: str = "booting"
    _stopping: bool = False

    # -- set-up ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the slot files, an empty boot env and journal."""
        self.directory.mkdir(parents=True, exist_ok=True)
        kinds = {f.kind for f in self.faults}
        if kinds & {FaultKind.POWER_CUT, FaultKind.DISK_FULL, FaultKind.IO_ERROR}:
            from agent.adapters.faultfs import FaultFS  # noqa: PLC0415

            fs = FaultFS()
            fs.put(self._p("slot_a"), Path(self.fw.base_image).read_bytes())
            fs.put(self._p("slot_b"), b"")
            for f in self.faults:
                if f.kind is FaultKind.IO_ERROR:
                    fs.io_error_paths.add(self._p("slot_b"))
            self.fs = fs
        else:
            a = self.directory / "slot_a"
            if not a.exists():
                os.link(self.fw.base_image, a)
            b = self.directory / "slot_b"
            if not b.exists():
                with b.open("wb") as fh:
                    fh.truncate(self.fw.image_size)
        (self.directory / "app-healthy").touch()

    def _p(self, name: str) -> str:
        return str(self.directory / name)

    def _cut_after(self) -> int | None:
        for f in self.faults:
            if f.kind is FaultKind.POWER_CUT and self.stats.power_cuts == 0:
                if f.at_step is not None:
                    return f.at_step
                # A random durable step of the update: chunk writes, syncs, journal and env.
                rng = random.Random(self.seed)  # noqa: S311 - seeded model
                chunks = max(1, self.fw.image_size // (64 * 1024))
                return rng.randint(1, 4 * chunks + 30)
        return None

    # -- life -----------------------------------------------------------------------------
    async def life(self) -> None:
        """Boot, run the agent until it asks for a reboot or power is cut, boot again."""
        from agent.adapters.bootenv import RedundantEnv, SimBootloader  # noqa: PLC0415

        for _ in range(1000):  # bounded: a boot loop ends in the bootloader's fallback
            if self._stopping:
                return
            env = RedundantEnv(self._p("bootenv"), fs=self.fs) if self.fs else RedundantEnv(
                self._p("bootenv"))
            booted = SimBootloader(env).boot()
            self.stats.boots += 1
            version = self._version_in(booted)
            if version == self.fw.to_version and self._fault(FaultKind.NEVER_BOOTS, version):
                # The kernel panics before the agent starts; the watchdog resets the board.
                self.phase = "panic"
                await asyncio.sleep(BOOT_DELAY * 4)
                continue
            outcome = await self._run_agent(booted, version)
            if outcome == "stopped":
                return
            await asyncio.sleep(BOOT_DELAY)

    def _fault(self, kind: FaultKind, version: str | None) -> Fault | None:
        for f in self.faults:
            if f.kind is kind and (f.version is None or f.version == version):
                return f
        return None

    def _version_in(self, slot: Any) -> str | None:
        if not any(f.kind in (FaultKind.NEVER_BOOTS, FaultKind.SELF_TEST_FAIL,
                              FaultKind.SELF_TEST_HANG) for f in self.faults):
            return None
        import hashlib  # noqa: PLC0415

        path = self._p(f"slot_{slot.value}")
        if self.fs is not None:
            data = self.fs.content(path)[: self.fw.image_size]
        else:
            with open(path, "rb") as fh:  # noqa: PTH123 - plain read of a slot file
                data = fh.read(self.fw.image_size)
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.fw.to_sha256:
            return self.fw.to_version
        if digest == self.fw.from_sha256:
            return self.fw.from_version
        return None

    def _selftest(self, version: str | None, transport: Any) -> Any:
        from agent.selftest import Check, SelfTestRunner  # noqa: PLC0415

        healthy = self.directory / "app-healthy"
        checks = [Check("file", name="application", path=str(healthy))]
        fail = self._fault(FaultKind.SELF_TEST_FAIL, version)
        hang = self._fault(FaultKind.SELF_TEST_HANG, version)
        if fail is not None and version is not None:
            checks = [Check("file", name="application", path=str(healthy) + ".missing")]
        if hang is not None and version is not None:
            checks.append(Check("command", name="application-hangs",
                                argv=("sleep", str(int(max(1, hang.duration)))), timeout=3.0))
        # Generous on the controller check: a loaded controller answering in 20 s is healthy.
        checks.append(Check("controller", name="controller", timeout=30.0))
        return SelfTestRunner(checks, deadline=60.0, transport=transport)

    async def _run_agent(self, booted: Any, version: str | None) -> str:
        from agent.adapters.bootenv import RedundantEnv  # noqa: PLC0415
        from agent.adapters.faultfs import PowerCut  # noqa: PLC0415
        from agent.adapters.mqtt import MqttTransport  # noqa: PLC0415
        from agent.adapters.slots import FileSlots  # noqa: PLC0415
        from agent.adapters.state_file import FileJournal  # noqa: PLC0415
        from agent.runtime import Agent, AgentConfig  # noqa: PLC0415
        from agent.transport.aioclient import MqttSettings  # noqa: PLC0415
        from simulator.linked import LinkedTransport  # noqa: PLC0415
        from simulator.verify import make_verifier  # noqa: PLC0415

        skew = sum(f.skew for f in self.faults if f.kind is FaultKind.CLOCK_SKEW)
        clock = _Clock(skew)
        settings = MqttSettings.from_url(self.broker_url, self.spec.device_id,
                                         keepalive=30, backoff_initial=0.2, backoff_max=2.0,
                                         session_expiry=600)
        inner = MqttTransport(self.spec.device_id, settings, clock=clock, request_timeout=5.0)
        transport = LinkedTransport(inner, self.link, self.elapsed,
                                    chunks_over_lan=self.behind_relay)
        fs = self.fs
        media: Any = fs
        full = next((f for f in self.faults if f.kind is FaultKind.DISK_FULL), None)
        if full is not None and fs is not None:
            media = _FullDisk(fs, self._p("slot_b"), self.fw.image_size // 3)
        slots = FileSlots(self._p("slot_a"), self._p("slot_b"), booted=booted,
                          capacity=self.fw.image_size, fs=media)
        agent = Agent(
            AgentConfig(device_id=self.spec.device_id, hardware=self.spec.hardware,
                        factory_version=self.fw.from_version, factory_size=self.fw.image_size,
                        retry_base=0.5, retry_cap=4.0),
            slots=slots, bootenv=RedundantEnv(self._p("bootenv"), fs=media),
            journal=FileJournal(self._p("journal.json"), fs=media), clock=clock, power=_Power(),
            booted=booted, transport=transport,
            verifier=make_verifier(self.fw.trust_root, self.spec.device_id, self.spec.hardware),
            selftest=self._selftest(version, transport),
        )
        self.agent, self.transport = agent, transport
        # Connect before the agent reconciles: a trial boot's self-test checks the controller,
        # and the runtime starts its transport only after that reconciliation.
        await transport.start()
        # A booting device's first words (a revert's result event) must not race the CONNACK.
        await inner.client.wait_connected(10.0)
        task = asyncio.ensure_future(agent.run())
        cut = self._cut_after() if fs is not None else None
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.05)
                if (cut is not None and fs.cut_after is None and agent.started
                        and agent.state.phase.busy):
                    # Arm the cut once an update is under way: step k of *the update*.
                    fs.cut_after = fs.ops + cut
                if fs is not None and getattr(fs, "dead", False):
                    # Power is gone: no clean disconnect, no last words; the medium keeps only
                    # what the file system made durable.
                    with contextlib.suppress(Exception):
                        inner.client.drop_link()
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    self.stats.power_cuts += 1
                    self.fs = fs.crash("drop")
                    return "reboot"
            try:
                outcome = task.result()
            except PowerCut:
                self.stats.power_cuts += 1
                self.fs = fs.crash("drop") if fs is not None else None
                return "reboot"
        finally:
            with contextlib.suppress(Exception):
                slots.close()
        return str(outcome)

    def stop(self) -> None:
        """End the device's life after the current agent run."""
        self._stopping = True
        if self.agent is not None:
            self.agent.stop()

    # -- reporting ------------------------------------------------------------------------
    def current_phase(self) -> str:
        """The phase shown in the live view."""
        if self.agent is not None and getattr(self.agent, "started", False):
            return str(self.agent.state.phase.value)
        return self.phase

    def busy(self) -> bool:
        """Whether an update is in flight on this device."""
        phase = self.current_phase()
        return phase not in ("idle", "committed", "reverted", "failed")

    def result(self) -> DeviceResult:
        """The device's outcome, read from its own journal and boot env."""
        return outcome_of(self)


def outcome_of(dev: VirtualDevice) -> DeviceResult:
    """Decide a device's outcome from the medium (journal, boot env, slot content)."""
    import hashlib  # noqa: PLC0415

    from agent.adapters.bootenv import RedundantEnv, SimBootloader  # noqa: PLC0415
    from agent.adapters.faultfs import FaultFS  # noqa: PLC0415
    from agent.adapters.state_file import FileJournal  # noqa: PLC0415
    from agent.journal import decode  # noqa: PLC0415

    fs = dev.fs
    if fs is not None and fs.dead:
        # The run ended right after a power cut: judge what the medium kept.
        fs = dev.fs = fs.crash("drop")
    # Boot a copy of the env: which slot would come up next, and does it hold a good image?
    if fs is not None:
        probe = fs.crash("keep")
        env_fs: Any = probe
    else:
        probe = FaultFS()
        for name in ("bootenv",):
            p = dev.directory / name
            if p.exists():
                probe.put(dev._p(name), p.read_bytes())  # noqa: SLF001
        env_fs = probe
    # Power the board on until something boots, as the hardware would: an image that does not
    # come up costs a boot, and U-Boot's counter falls back after bootlimit. Nothing booting
    # within a handful of tries is a brick.
    loader = SimBootloader(RedundantEnv(dev._p("bootenv"), fs=env_fs))  # noqa: SLF001
    version = None
    never = False
    for _ in range(8):
        slot = loader.boot()
        path = dev._p(f"slot_{slot.value}")  # noqa: SLF001
        if fs is not None:
            data = probe.content(path)[: dev.fw.image_size]
        else:
            with open(path, "rb") as fh:  # noqa: PTH123
                data = fh.read(dev.fw.image_size)
        digest = hashlib.sha256(data).hexdigest()
        version = {dev.fw.to_sha256: dev.fw.to_version,
                   dev.fw.from_sha256: dev.fw.from_version}.get(digest)
        never = bool(version == dev.fw.to_version
                     and dev._fault(FaultKind.NEVER_BOOTS, version))  # noqa: SLF001
        if version is not None and not never:
            break
    raw = FileJournal(dev._p("journal.json"), fs=fs).load()  # noqa: SLF001
    state = decode(raw) if raw else None
    result = state.last_result if state else None
    phase = state.phase.value if state else "idle"
    error = result.code if result else None
    message = result.message if result else None
    if version is None or never:
        outcome = Outcome.BRICKED
    elif phase not in ("idle", "committed", "reverted", "failed"):
        outcome = Outcome.PENDING
        message = f"still in phase {phase} when the run ended"
    elif result is None:
        outcome = Outcome.UNTOUCHED
    elif result.outcome == "committed" and version == dev.fw.to_version:
        outcome = Outcome.COMMITTED
    elif result.outcome in ("reverted", "rolled_back") and version == dev.fw.from_version:
        outcome = Outcome.REVERTED
    elif version == dev.fw.from_version:
        outcome = Outcome.FAILED
    else:
        outcome = Outcome.COMMITTED if version == dev.fw.to_version else Outcome.FAILED
    return DeviceResult(
        device_id=dev.spec.device_id, hardware=dev.spec.hardware, site=dev.spec.site,
        tags=tuple(sorted(dev.spec.tags)), outcome=outcome, version=version, error=error,
        message=message,
        faults=tuple(f.kind.value for f in dev.faults), boots=dev.stats.boots,
        power_cuts=dev.stats.power_cuts, finished_at=dev.stats.finished_at,
    )


# ----------------------------------------------------------------------------- process main


def _links(scenario: Scenario, seed: int) -> dict[str, Link]:
    out = {}
    for i, s in enumerate(scenario.sites):
        windows = [Window(o.at, o.at + o.duration) for o in s.outages]
        for f in scenario.faults:
            if f.kind is FaultKind.LINK_FLAP and f.site == s.name:
                windows.extend(LinkProfile.flapping(f.at, f.period, f.duration, f.times))
        out[s.name] = Link(LinkProfile(bandwidth=s.bandwidth, latency=s.latency, loss=s.loss,
                                       outages=tuple(windows)), seed=seed * 31 + i)
    return out


def main(cfg: WorkerConfig, outbox: Any, stop: Any, t0: Any) -> None:
    """Process entry point: run the shard until ``stop`` is set, then report outcomes."""
    try:
        asyncio.run(_main(cfg, outbox, stop, t0))
    except BaseException:  # report, never die silently (the driver waits for our message)
        outbox.put(("error", cfg.index, traceback.format_exc(limit=8)))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def _main(cfg: WorkerConfig, outbox: Any, stop: Any, t0: Any) -> None:
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.ERROR)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
    links = _links(cfg.scenario, cfg.scenario.meta.seed)

    def elapsed() -> float:
        return time.time() - float(t0.value)

    # The real relay of each relay site of this shard, before its devices ask it for chunks.
    relays: dict[str, SiteRelay] = {}
    for site in sorted({d.site for d in cfg.devices} & set(cfg.site_brokers)):
        relays[site] = await siterelay.start_relay(
            site, site_url=cfg.site_brokers[site], central_url=cfg.broker_url, link=links[site],
            elapsed=elapsed, cache_dir=cfg.work_dir / f"relay-{site}")
    devices = [
        VirtualDevice(spec=d, faults=cfg.faults.get(d.device_id, []),
                      directory=cfg.work_dir / d.device_id, fw=cfg.firmware,
                      broker_url=cfg.site_brokers.get(d.site, cfg.broker_url),
                      link=links[d.site], elapsed=elapsed,
                      seed=cfg.scenario.meta.seed * 1_000_003 + d.index,
                      behind_relay=d.site in relays)
        for d in cfg.devices
    ]
    for d in devices:
        d.prepare()
    tasks = []
    # Stagger connects a little: thousands of CONNECTs at once only measure the broker's backlog.
    for i, d in enumerate(devices):
        tasks.append(asyncio.create_task(d.life()))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    # Ready once every device's agent runs and its transport is connected.
    deadline = time.monotonic() + 60 + len(devices) * 0.05
    while time.monotonic() < deadline:
        up = sum(1 for d in devices if d.transport is not None
                 and getattr(d.transport.inner.client, "connected", False))
        if up >= len(devices):
            break
        await asyncio.sleep(0.5)
        phases = Counter(d.current_phase() if d.transport is not None else "booting"
                         for d in devices)
        outbox.put(("progress", cfg.index, dict(phases), 0, _site_stats(links, relays), 0,
                    _rss()))
    outbox.put(("ready", cfg.index))
    while not stop.is_set():
        await asyncio.sleep(PROGRESS_EVERY)
        phases = Counter(d.current_phase() for d in devices)
        busy = sum(1 for d in devices if d.busy())
        outbox.put(("progress", cfg.index, dict(phases), busy, _site_stats(links, relays),
                    _messages(devices), _rss()))
    for d in devices:
        d.stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    await siterelay.stop_relays(relays)
    results = [d.result() for d in devices]
    outbox.put(("result", cfg.index, results, _site_stats(links, relays), _messages(devices),
                _rss()))


def _site_stats(links: dict[str, Link], relays: dict[str, SiteRelay]) -> dict[str, dict[str, int]]:
    out = {name: asdict(link.stats) for name, link in links.items()}
    for site, figures in siterelay.relay_stats(relays).items():
        out[site].update(figures)
    return out


def _messages(devices: Sequence[VirtualDevice]) -> int:
    del devices
    from simulator.linked import LinkedTransport  # noqa: PLC0415

    return LinkedTransport.total_messages
