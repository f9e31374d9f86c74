"""Scenario files: a fleet, its sites and links, faults, a rollout and the expected outcome.

Rules:
- A scenario is TOML, parsed by ``tomllib`` and validated here into frozen dataclasses; nothing
  downstream sees raw dicts.
- Every mistake is a ``ScenarioInvalid`` naming the file, the line and the field
  (``fleet.toml:14: fault[1].kind: unknown fault 'powercut' (expected one of: ...)``). Unknown
  keys are mistakes too: a typo must not silently mean "default".
- Units are explicit strings (``"20Mbit"``, ``"250ms"``, ``"2MiB"``; see ``units``).

A minimal scenario::

    [scenario]
    name = "smoke"

    [[site]]
    name = "plant"

    [[fleet]]
    count = 10
    hardware = "gw-100"
    site = "plant"

    [rollout]
    phases = [50, 100]

    [expect]
    rollout = "finished"
    committed_min = 10
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path as FsPath
from typing import Any, TypeVar

from simulator import units
from simulator.errors import ScenarioInvalid
from simulator.tomlpos import Path, format_path, key_lines, line_of

T = TypeVar("T")

MAX_NETNS_DEVICES = 16  # devices on real links (network namespaces) in one run


class FaultKind(enum.Enum):
    """Faults, named after the physical event they stand for."""

    POWER_CUT = "power_cut"  # power lost after durable operation k of the update
    SELF_TEST_FAIL = "self_test_fail"  # the new image's self-test reports failure
    SELF_TEST_HANG = "self_test_hang"  # the new image's self-test never answers
    NEVER_BOOTS = "never_boots"  # the new image does not come up at all (kernel panic)
    DISK_FULL = "disk_full"  # writes to the inactive slot fail with ENOSPC
    IO_ERROR = "io_error"  # a write to the inactive slot fails with EIO
    LINK_FLAP = "link_flap"  # a site's link goes down and up periodically
    CLOCK_SKEW = "clock_skew"  # a device's wall clock is off by a fixed amount
    BROKER_RESTART = "broker_restart"  # the MQTT broker goes away and comes back
    CONTROLLER_RESTART = "controller_restart"  # the controller process is killed and restarted


DEVICE_FAULTS = frozenset(
    {FaultKind.POWER_CUT, FaultKind.SELF_TEST_FAIL, FaultKind.SELF_TEST_HANG,
     FaultKind.NEVER_BOOTS, FaultKind.DISK_FULL, FaultKind.IO_ERROR, FaultKind.CLOCK_SKEW}
)


class Outcome(enum.Enum):
    """How one device ended a run."""

    COMMITTED = "committed"  # runs the target version, committed
    REVERTED = "reverted"  # tried the target, came back to its old slot on its own
    FAILED = "failed"  # refused or abandoned the update before switching (error reported)
    UNTOUCHED = "untouched"  # never commanded (not targeted, or the rollout stopped first)
    PENDING = "pending"  # commanded, still in progress when the run ended
    BRICKED = "bricked"  # no verified slot would boot: the one outcome that must never happen


class RolloutEnd(enum.Enum):
    """The rollout's state at the end of the run."""

    FINISHED = "finished"
    PAUSED = "paused"
    STOPPED = "stopped"  # aborted
    RUNNING = "running"


@dataclass(frozen=True)
class Selector:
    """Picks devices: all given criteria must hold; then ``count`` or ``percent`` of them."""

    hardware: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # a device must carry every tag listed
    count: int | None = None
    percent: int | None = None

    def matches(self, hardware: str, site: str, tags: frozenset[str]) -> bool:
        """Whether a device with these properties passes the criteria (before count/percent)."""
        return (
            (not self.hardware or hardware in self.hardware)
            and (not self.sites or site in self.sites)
            and all(t in tags for t in self.tags)
        )


@dataclass(frozen=True)
class Meta:
    """The ``[scenario]`` table."""

    name: str
    description: str = ""
    seed: int = 1
    timeout: float = 120.0  # wall seconds before the run is declared stuck


@dataclass(frozen=True)
class Firmware:
    """The ``[firmware]`` table: the two images the run builds."""

    image_size: int = 1024 * 1024
    chunk_size: int = 64 * 1024
    from_version: str = "1.0.0"
    to_version: str = "1.1.0"
    payload: str = "delta"  # delta | full
    change: float = 0.05  # fraction of the image that differs between the two versions


@dataclass(frozen=True)
class Outage:
    """A scheduled link outage, relative to the start of the rollout."""

    at: float
    duration: float


@dataclass(frozen=True)
class Site:
    """One ``[[site]]``: a place behind one link."""

    name: str
    bandwidth: int | None = None  # bit/s of the site's WAN link; None = not limiting
    latency: float = 0.0  # one-way seconds
    loss: float = 0.0  # packet loss probability (costs a TCP retransmit, not a message)
    relay: bool = False  # the real site relay runs at this site (simulator/siterelay.py)
    metered: bool = False  # shown separately in the report (WAN bytes cost money)
    timezone: str = "UTC"
    outages: tuple[Outage, ...] = ()
    netns: int = 0  # this many of the site's devices run behind a real shaped link (root only)


@dataclass(frozen=True)
class FleetGroup:
    """One ``[[fleet]]`` entry: ``count`` identical devices."""

    count: int
    hardware: str
    site: str
    tags: tuple[str, ...] = ()
    id_prefix: str = ""


@dataclass(frozen=True)
class Rollout:
    """The ``[rollout]`` table, in the controller's terms."""

    name: str = "sim-rollout"
    target: Selector = field(default_factory=Selector)
    trial: Selector | None = None
    phases: tuple[int, ...] = (100,)  # cumulative percent of the target after the trial group
    min_successes: int = 1
    max_failure_rate: int = 10  # percent of a group's devices
    soak: float = 0.0
    on_gate_failure: str = "pause"  # pause | abort
    concurrency: int = 0  # devices updating at once; 0 = no limit
    start_after: float = 0.0


@dataclass(frozen=True)
class Fault:
    """One ``[[fault]]``: a physical event injected into the run."""

    kind: FaultKind
    select: Selector = field(default_factory=Selector)
    at_step: int | None = None  # power_cut: durable operation index; None = random
    version: str | None = None  # self-test and boot faults: only in this version
    site: str | None = None  # link_flap
    at: float = 0.0  # broker/controller restart, flap start
    duration: float = 5.0  # hang length, downtime
    period: float = 10.0  # link_flap period
    skew: float = 0.0  # clock_skew seconds (may be negative)
    times: int = 1  # io_error: how many writes fail; link_flap: how many flaps


@dataclass(frozen=True)
class DeviceExpectation:
    """``[[expect.devices]]``: every selected device (that was commanded) ends this way."""

    select: Selector
    outcome: Outcome
    version: str | None = None
    error: str | None = None  # stable error code the device reported (prefix match)


@dataclass(frozen=True)
class SiteExpectation:
    """``[[expect.sites]]``: a bound on one site's WAN bytes, as a ratio to the bundle size."""

    name: str
    wan_ratio_max: float


@dataclass(frozen=True)
class Expect:
    """The ``[expect]`` table. ``bricked_max`` is always checked (default 0)."""

    bricked_max: int = 0
    rollout: RolloutEnd | None = None
    committed_min: int | None = None
    committed_max: int | None = None
    reverted_min: int | None = None
    reverted_max: int | None = None
    pending_max: int | None = None  # devices still mid-update when the run ended
    devices: tuple[DeviceExpectation, ...] = ()
    sites: tuple[SiteExpectation, ...] = ()


@dataclass(frozen=True)
class Scenario:
    """A validated scenario file."""

    meta: Meta
    firmware: Firmware
    sites: tuple[Site, ...]
    fleet: tuple[FleetGroup, ...]
    rollout: Rollout
    faults: tuple[Fault, ...]
    expect: Expect
    source: str = "<string>"

    @property
    def device_count(self) -> int:
        """Total number of virtual devices."""
        return sum(g.count for g in self.fleet)

    def site(self, name: str) -> Site:
        """The site called ``name`` (validated to exist)."""
        return next(s for s in self.sites if s.name == name)

    def scaled(self, devices: int) -> Scenario:
        """The same scenario with the fleet resized to about ``devices`` (proportionally)."""
        total = self.device_count
        groups = []
        for g in self.fleet:
            n = max(1, round(g.count * devices / total))
            groups.append(FleetGroup(n, g.hardware, g.site, g.tags, g.id_prefix))
        return Scenario(self.meta, self.firmware, self.sites, tuple(groups), self.rollout,
                        self.faults, self.expect, self.source)


# ----------------------------------------------------------------------------- validation


class _Ctx:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = key_lines(text)

    def fail(self, path: Path, message: str) -> ScenarioInvalid:
        return ScenarioInvalid(self.source, line_of(self.lines, path), format_path(path), message)


_MISSING = object()


class _Table:
    """A dict being consumed: every key must be taken, leftovers are unknown-key errors."""

    def __init__(self, ctx: _Ctx, path: Path, data: object) -> None:
        if not isinstance(data, dict):
            raise ctx.fail(path, f"expected a table, got {type(data).__name__}")
        self.ctx, self.path, self.data = ctx, path, dict(data)
        self.seen: set[str] = set()

    def get(self, key: str, conv: Callable[[Path, Any], T], default: Any = _MISSING) -> T:
        self.seen.add(key)
        path = (*self.path, key)
        if key not in self.data:
            if default is _MISSING:
                raise self.ctx.fail(path, "required field is missing")
            result: T = default
            return result
        return conv(path, self.data[key])

    def finish(self, allowed_hint: str = "") -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            known = ", ".join(sorted(self.seen))
            hint = f" (known fields: {known})" if known else allowed_hint
            raise self.ctx.fail((*self.path, extra[0]), f"unknown field {extra[0]!r}{hint}")


def _scenario_kinds(ctx: _Ctx) -> dict[str, Callable[[Path, Any], Any]]:
    def string(path: Path, v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise ctx.fail(path, f"expected a non-empty string, got {v!r}")
        return v

    def integer(lo: int | None = None, hi: int | None = None) -> Callable[[Path, Any], int]:
        def conv(path: Path, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ctx.fail(path, f"expected an integer, got {v!r}")
            if lo is not None and v < lo:
                raise ctx.fail(path, f"must be >= {lo}, got {v}")
            if hi is not None and v > hi:
                raise ctx.fail(path, f"must be <= {hi}, got {v}")
            return v
        return conv

    def fraction(path: Path, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise ctx.fail(path, f"expected a number between 0 and 1, got {v!r}")
        return float(v)

    def boolean(path: Path, v: Any) -> bool:
        if not isinstance(v, bool):
            raise ctx.fail(path, f"expected true or false, got {v!r}")
        return v

    def wrap(parse: Callable[[object], Any], *, nonneg: bool = False) -> Callable[[Path, Any], Any]:
        def conv(path: Path, v: Any) -> Any:
            try:
                out = parse(v)
            except units.UnitError as e:
                raise ctx.fail(path, str(e)) from None
            if nonneg and out < 0:
                raise ctx.fail(path, "must not be negative")
            return out
        return conv

    def strings(path: Path, v: Any) -> tuple[str, ...]:
        if isinstance(v, str):
            return (string(path, v),)
        if not isinstance(v, list):
            raise ctx.fail(path, f"expected a string or a list of strings, got {v!r}")
        return tuple(string((*path, i), x) for i, x in enumerate(v))

    return {
        "str": string, "int": integer(), "nat": integer(0), "pos": integer(1),
        "pct": integer(0, 100), "fraction": fraction, "bool": boolean,
        "duration": wrap(units.parse_duration, nonneg=True),
        "signed_duration": wrap(units.parse_duration),
        "size": wrap(units.parse_size), "rate": wrap(units.parse_rate), "strings": strings,
    }


def _enum(ctx: _Ctx, cls: type[enum.Enum]) -> Callable[[Path, Any], Any]:
    def conv(path: Path, v: Any) -> Any:
        try:
            return cls(v)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ctx.fail(path, f"unknown value {v!r} (expected one of: {allowed})") from None
    return conv


def _choice(ctx: _Ctx, *allowed: str) -> Callable[[Path, Any], str]:
    def conv(path: Path, v: Any) -> str:
        if v not in allowed:
            raise ctx.fail(path, f"unknown value {v!r} (expected one of: {', '.join(allowed)})")
        return str(v)
    return conv


def _array_of_tables(ctx: _Ctx, path: Path, v: Any) -> list[Any]:
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ctx.fail(path, "expected an array of tables ([[...]] sections)")
    return v


def _selector(ctx: _Ctx, path: Path, v: Any) -> Selector:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)
    sites = t.get("sites", k["strings"], ())
    site = t.get("site", k["strings"], ())
    sel = Selector(
        hardware=t.get("hardware", k["strings"], ()),
        sites=sites + site,
        tags=t.get("tags", k["strings"], ()),
        count=t.get("count", k["pos"], None),
        percent=t.get("percent", k["pct"], None),
    )
    t.finish()
    if sel.count is not None and sel.percent is not None:
        raise ctx.fail((*path, "percent"), "give count or percent, not both")
    return sel


def parse(text: str, source: str = "<string>") -> Scenario:
    """Validate a scenario document.

    Args:
        text: the TOML document.
        source: the file name used in error messages.

    Raises:
        ScenarioInvalid: with the file, line and field of the first mistake.

    Returns:
        The validated scenario.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib reports "... (at line L, column C)": lift the line into our format.
        msg = str(e)
        line = None
        if "(at line " in msg:
            tail = msg.rsplit("(at line ", 1)[1]
            line = int(tail.split(",")[0].rstrip(")"))
            msg = msg.rsplit(" (at line ", 1)[0]
        raise ScenarioInvalid(source, line, "", f"not valid TOML: {msg}") from None
    ctx = _Ctx(source, text)
    root = _Table(ctx, (), doc)

    meta = root.get("scenario", lambda p, v: _meta(ctx, p, v))
    firmware = root.get("firmware", lambda p, v: _firmware(ctx, p, v), Firmware())
    sites = tuple(
        _site(ctx, ("site", i), s)
        for i, s in enumerate(root.get("site", lambda p, v: _array_of_tables(ctx, p, v)))
    )
    if not sites:
        raise ctx.fail(("site",), "at least one [[site]] is required")
    names = [s.name for s in sites]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ctx.fail(("site", i, "name"), f"site {n!r} is defined twice")
    fleet = tuple(
        _fleet(ctx, ("fleet", i), g, set(names))
        for i, g in enumerate(root.get("fleet", lambda p, v: _array_of_tables(ctx, p, v)))
    )
    if not fleet:
        raise ctx.fail(("fleet",), "at least one [[fleet]] group is required")
    hardware = {g.hardware for g in fleet}
    rollout = root.get("rollout", lambda p, v: _rollout(ctx, p, v, set(names), hardware))
    faults = tuple(
        _fault(ctx, ("fault", i), f, set(names), hardware, fw=firmware)
        for i, f in enumerate(root.get("fault", lambda p, v: _array_of_tables(ctx, p, v), []))
    )
    expect = root.get("expect", lambda p, v: _expect(ctx, p, v, set(names), hardware), Expect())
    root.finish()
    _check_netns(ctx, sites, fleet, faults)
    return Scenario(meta, firmware, sites, fleet, rollout, faults, expect, source)


def load(path: str | FsPath) -> Scenario:
    """Read and validate a scenario file (see ``parse``)."""
    p = FsPath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioInvalid(str(p), None, "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ScenarioInvalid(str(p), None, "", "not UTF-8 text") from None
    return parse(text, str(p))


def _meta(ctx: _Ctx, path: Path, v: Any) -> Meta:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)
    m = Meta(
        name=t.get("name", k["str"]),
        description=t.get("description", k["str"], ""),
        seed=t.get("seed", k["int"], 1),
        timeout=t.get("timeout", k["duration"], 120.0),
    )
    t.finish()
    if m.timeout <= 0:
        raise ctx.fail((*path, "timeout"), "must be positive")
    return m


def _firmware(ctx: _Ctx, path: Path, v: Any) -> Firmware:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)
    f = Firmware(
        image_size=t.get("image_size", k["size"], 1024 * 1024),
        chunk_size=t.get("chunk_size", k["size"], 64 * 1024),
        from_version=t.get("from_version", k["str"], "1.0.0"),
        to_version=t.get("to_version", k["str"], "1.1.0"),
        payload=t.get("payload", _choice(ctx, "delta", "full"), "delta"),
        change=t.get("change", k["fraction"], 0.05),
    )
    t.finish()
    if not 4096 <= f.image_size <= 1024**3:
        raise ctx.fail((*path, "image_size"), "must be between 4KiB and 1GiB")
    if not 1024 <= f.chunk_size <= 16 * 1024**2:
        raise ctx.fail((*path, "chunk_size"), "must be between 1KiB and 16MiB")
    if f.from_version == f.to_version:
        raise ctx.fail((*path, "to_version"), "must differ from from_version")
    return f


def _site(ctx: _Ctx, path: Path, v: Any) -> Site:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)

    def outages(p: Path, raw: Any) -> tuple[Outage, ...]:
        out = []
        for i, o in enumerate(_array_of_tables(ctx, p, raw)):
            ot = _Table(ctx, (*p, i), o)
            out.append(Outage(ot.get("at", k["duration"]), ot.get("duration", k["duration"])))
            ot.finish()
        return tuple(out)

    s = Site(
        name=t.get("name", k["str"]),
        bandwidth=t.get("bandwidth", k["rate"], None),
        latency=t.get("latency", k["duration"], 0.0),
        loss=t.get("loss", k["fraction"], 0.0),
        relay=t.get("relay", k["bool"], False),
        metered=t.get("metered", k["bool"], False),
        timezone=t.get("timezone", k["str"], "UTC"),
        outages=t.get("outage", outages, ()),
        netns=t.get("netns", k["nat"], 0),
    )
    t.finish()
    if s.loss >= 0.5:
        raise ctx.fail((*path, "loss"), "a link losing half its packets carries no TCP: use < 0.5")
    _check_site_netns(ctx, path, s)
    return s


def _check_site_netns(ctx: _Ctx, path: Path, s: Site) -> None:
    if s.netns and s.relay:
        raise ctx.fail((*path, "netns"), "real links and a site relay do not combine yet")
    if s.netns and s.outages:
        raise ctx.fail((*path, "netns"), "outages are not applied to real links; drop one")


def with_netns(s: Scenario, site: str, count: int, source: str = "--netns") -> Scenario:
    """``s`` with ``count`` of ``site``'s devices on a real link (``sim run --netns SITE=N``).

    Raises:
        ScenarioInvalid: no such site, or the count breaks a rule of ``[[site]] netns``.
    """
    ctx = _Ctx(source, "")
    names = [x.name for x in s.sites]
    if site not in names:
        raise ctx.fail((), f"unknown site {site!r} (sites: {', '.join(names)})")
    if count < 0:
        raise ctx.fail((), f"must be >= 0, got {count}")
    i = names.index(site)
    sites = tuple(replace(x, netns=count) if x.name == site else x for x in s.sites)
    _check_site_netns(ctx, ("site", i), sites[i])
    _check_netns(ctx, sites, s.fleet, s.faults)
    return replace(s, sites=sites)


def _check_netns(ctx: _Ctx, sites: tuple[Site, ...], fleet: tuple[FleetGroup, ...],
                 faults: tuple[Fault, ...]) -> None:
    """Real links: no more devices than the site has, at most ``MAX_NETNS_DEVICES`` in all."""
    total = 0
    for i, s in enumerate(sites):
        if not s.netns:
            continue
        have = sum(g.count for g in fleet if g.site == s.name)
        if s.netns > have:
            raise ctx.fail(("site", i, "netns"), f"site {s.name!r} has only {have} devices")
        total += s.netns
        if total > MAX_NETNS_DEVICES:
            raise ctx.fail(("site", i, "netns"),
                           f"at most {MAX_NETNS_DEVICES} devices on real links in one run")
    netns_sites = {s.name for s in sites if s.netns}
    for i, f in enumerate(faults):
        if f.kind is FaultKind.LINK_FLAP and f.site in netns_sites:
            raise ctx.fail(("fault", i, "site"), "link_flap is not applied to real links")


def _fleet(ctx: _Ctx, path: Path, v: Any, sites: set[str]) -> FleetGroup:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)
    g = FleetGroup(
        count=t.get("count", k["pos"]),
        hardware=t.get("hardware", k["str"]),
        site=t.get("site", k["str"]),
        tags=t.get("tags", k["strings"], ()),
        id_prefix=t.get("id_prefix", k["str"], ""),
    )
    t.finish()
    if g.site not in sites:
        known = ", ".join(sorted(sites))
        raise ctx.fail((*path, "site"), f"unknown site {g.site!r} (sites: {known})")
    if g.count > 100_000:
        raise ctx.fail((*path, "count"), "more than 100000 devices in one group")
    return g


def _check_selector_names(ctx: _Ctx, path: Path, sel: Selector, sites: set[str],
                          hardware: set[str] | None = None) -> None:
    for s in sel.sites:
        if s not in sites:
            raise ctx.fail((*path, "sites"), f"unknown site {s!r}")
    if hardware is not None:
        for h in sel.hardware:
            if h not in hardware:
                raise ctx.fail((*path, "hardware"), f"no [[fleet]] group has hardware {h!r}")


def _rollout(ctx: _Ctx, path: Path, v: Any, sites: set[str], hardware: set[str]) -> Rollout:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)

    def phases(p: Path, raw: Any) -> tuple[int, ...]:
        if not isinstance(raw, list) or not raw:
            raise ctx.fail(p, "expected a non-empty list of cumulative percents, e.g. [10, 100]")
        out = tuple(k["pct"]((*p, i), x) for i, x in enumerate(raw))
        for i in range(1, len(out)):
            if out[i] <= out[i - 1]:
                raise ctx.fail((*p, i), "phases must grow (cumulative percent of the target)")
        if out[-1] != 100:
            raise ctx.fail((*p, len(out) - 1), "the last phase must be 100")
        if out[0] <= 0:
            raise ctx.fail((*p, 0), "a phase must be above 0 percent")
        return out

    r = Rollout(
        name=t.get("name", k["str"], "sim-rollout"),
        target=t.get("target", lambda p, x: _selector(ctx, p, x), Selector()),
        trial=t.get("trial", lambda p, x: _selector(ctx, p, x), None),
        phases=t.get("phases", phases, (100,)),
        min_successes=t.get("min_successes", k["nat"], 1),
        max_failure_rate=t.get("max_failure_rate", k["pct"], 10),
        soak=t.get("soak", k["duration"], 0.0),
        on_gate_failure=t.get("on_gate_failure", _choice(ctx, "pause", "abort"), "pause"),
        concurrency=t.get("concurrency", k["nat"], 0),
        start_after=t.get("start_after", k["duration"], 0.0),
    )
    t.finish()
    _check_selector_names(ctx, (*path, "target"), r.target, sites, hardware)
    if r.target.count is not None or r.target.percent is not None:
        raise ctx.fail((*path, "target"), "a target selects by hardware, sites and tags only")
    if r.trial is not None:
        _check_selector_names(ctx, (*path, "trial"), r.trial, sites, hardware)
    return r


def _fault(ctx: _Ctx, path: Path, v: Any, sites: set[str], hardware: set[str],
           *, fw: Firmware) -> Fault:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)
    kind: FaultKind = t.get("kind", _enum(ctx, FaultKind))
    f = Fault(
        kind=kind,
        select=t.get("select", lambda p, x: _selector(ctx, p, x), Selector()),
        at_step=t.get("at_step", lambda p, x: None if x == "random" else k["nat"](p, x), None),
        version=t.get("version", k["str"], None),
        site=t.get("site", k["str"], None),
        at=t.get("at", k["duration"], 0.0),
        duration=t.get("duration", k["duration"], 5.0),
        period=t.get("period", k["duration"], 10.0),
        skew=t.get("skew", k["signed_duration"], 0.0),
        times=t.get("times", k["pos"], 1),
    )
    t.finish()
    _check_selector_names(ctx, (*path, "select"), f.select, sites, hardware)
    if kind is FaultKind.LINK_FLAP:
        if f.site is None:
            raise ctx.fail((*path, "site"), "link_flap needs the site whose link flaps")
        if f.site not in sites:
            raise ctx.fail((*path, "site"), f"unknown site {f.site!r}")
        if f.duration >= f.period:
            raise ctx.fail((*path, "duration"), "the link must be up part of each period")
    elif f.site is not None:
        raise ctx.fail((*path, "site"), f"only link_flap takes a site; {kind.value} uses select")
    if kind is FaultKind.CLOCK_SKEW and f.skew == 0:
        raise ctx.fail((*path, "skew"), "clock_skew needs a non-zero skew, e.g. '-2h'")
    if f.version is not None and f.version not in (fw.from_version, fw.to_version):
        raise ctx.fail((*path, "version"), f"no firmware {f.version!r} in this scenario")
    if f.at_step is not None and kind is not FaultKind.POWER_CUT:
        raise ctx.fail((*path, "at_step"), "only power_cut takes at_step")
    return f


def _expect(ctx: _Ctx, path: Path, v: Any, sites: set[str], hardware: set[str]) -> Expect:
    k = _scenario_kinds(ctx)
    t = _Table(ctx, path, v)

    def devices(p: Path, raw: Any) -> tuple[DeviceExpectation, ...]:
        out = []
        for i, d in enumerate(_array_of_tables(ctx, p, raw)):
            dt = _Table(ctx, (*p, i), d)
            out.append(DeviceExpectation(
                select=dt.get("select", lambda pp, x: _selector(ctx, pp, x), Selector()),
                outcome=dt.get("outcome", _enum(ctx, Outcome)),
                version=dt.get("version", k["str"], None),
                error=dt.get("error", k["str"], None),
            ))
            dt.finish()
            _check_selector_names(ctx, (*p, i, "select"), out[-1].select, sites, hardware)
        return tuple(out)

    def site_bounds(p: Path, raw: Any) -> tuple[SiteExpectation, ...]:
        out = []
        for i, d in enumerate(_array_of_tables(ctx, p, raw)):
            dt = _Table(ctx, (*p, i), d)
            name = dt.get("name", k["str"])
            if name not in sites:
                raise ctx.fail((*p, i, "name"), f"unknown site {name!r}")
            ratio = dt.get("wan_ratio_max", lambda pp, x: _positive_number(ctx, pp, x))
            dt.finish()
            out.append(SiteExpectation(name, ratio))
        return tuple(out)

    e = Expect(
        bricked_max=t.get("bricked_max", k["nat"], 0),
        rollout=t.get("rollout", _enum(ctx, RolloutEnd), None),
        committed_min=t.get("committed_min", k["nat"], None),
        committed_max=t.get("committed_max", k["nat"], None),
        reverted_min=t.get("reverted_min", k["nat"], None),
        reverted_max=t.get("reverted_max", k["nat"], None),
        pending_max=t.get("pending_max", k["nat"], None),
        devices=t.get("devices", devices, ()),
        sites=t.get("sites", site_bounds, ()),
    )
    t.finish()
    return e


def _positive_number(ctx: _Ctx, path: Path, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ctx.fail(path, f"expected a positive number, got {v!r}")
    return float(v)


def to_json(s: Scenario) -> Mapping[str, Any]:
    """A JSON-able summary of the scenario for the report."""
    return {
        "name": s.meta.name,
        "source": s.source,
        "seed": s.meta.seed,
        "devices": s.device_count,
        "sites": [
            {"name": x.name, "bandwidth_bps": x.bandwidth, "latency_s": x.latency,
             "loss": x.loss, "relay": x.relay, "metered": x.metered, "netns": x.netns}
            for x in s.sites
        ],
        "faults": [f.kind.value for f in s.faults],
        "phases": list(s.rollout.phases),
    }
