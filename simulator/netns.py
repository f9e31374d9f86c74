"""Real links: network namespaces joined to the root namespace by a veth pair shaped with ``tc``.

Rules:
- Root only. ``preflight`` names what is missing (``NetnsUnavailable``) before anything is made.
- Rate: htb on both veth ends with a short FIFO leaf (a site router's queue, not a 1000-packet
  bufferbloat). Latency: a netem leaf when the kernel has netem; when it has not (this project's
  CI kernel), ``ShapedLink.latency_by`` says ``"none"`` and the caller adds the delay in
  userspace (``simulator.wanproxy``). Loss: iptables ``statistic`` drops on input at each end
  (the namespace's INPUT for the downlink, the root INPUT for packets from the host end for the
  uplink), after the shaper, as a wire loses packets.
- ``Shape.per_packet`` caps GSO at one segment per packet on both ends: otherwise the veth
  carries 64 KiB super-packets, and one "lost packet" is 45 segments.
- Names made by the simulator carry the owner's pid (``slts<pid>-<i>``, interfaces
  ``<ns>-h``/``<ns>-n``): ``clean_stale`` removes what a killed run left, never a live run's.
- ``destroy`` never raises; it runs from ``finally`` and from atexit.

    link = create(Veth("slts4242-0", "slts4242-0-h", "slts4242-0-n", "10.213.0.1", "10.213.0.2"),
                  Shape(rate_bps=2_000_000, latency=0.04, loss=0.01, uplink_loss=0.01))
    try: ...
    finally: destroy(link)
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from simulator.errors import SimError

PREFIX = "slts"  # every namespace and interface the simulator makes starts with this
SUBNET = ipaddress.IPv4Network("10.213.0.0/16")  # /30 links are carved from here
_OWNED = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]$")
_CLONE_NEWNET = 0x40000000
_TIMEOUT = 10.0  # seconds any one ip/tc/iptables call may take


class NetnsUnavailable(SimError):
    """Real links need root, ``ip``, ``tc`` (and ``iptables`` for loss): something is missing."""

    code = "sim.netns_unavailable"


@dataclass(frozen=True)
class Shape:
    """What the real link does. ``rate_bps`` None: not limited; latency one way, in seconds."""

    rate_bps: int | None = None
    latency: float = 0.0
    loss: float = 0.0  # downlink (into the namespace)
    uplink_loss: float = 0.0  # out of the namespace
    burst: str = "15k"
    queue: int = 30  # leaf FIFO length in packets
    per_packet: bool = True  # GSO off: shaping and loss see MTU-sized packets


@dataclass(frozen=True)
class Veth:
    """A namespace and its veth pair; ``host_ip`` on the root end, ``ns_ip`` inside."""

    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    prefix: int = 30


@dataclass
class ShapedLink:
    """What ``create`` made (and ``destroy`` removes)."""

    veth: Veth
    shape: Shape
    latency_by: str = "none"  # "netem", or "none": the caller must add the latency
    root_rules: list[tuple[str, ...]] = field(default_factory=list)  # iptables, root namespace


def sh(*args: str, check: bool = True) -> str:
    """Run a command with a deadline; its stdout. ``check``: a non-zero exit raises."""
    try:
        out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise SimError(f"{' '.join(args)} took more than {_TIMEOUT:g} s") from e
    if check and out.returncode != 0:
        raise SimError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def preflight(*, loss: bool) -> None:
    """Raise ``NetnsUnavailable`` naming every missing piece (root, ip, tc, iptables)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and tc need it)")
    tools = ["ip", "tc"] + (["iptables"] if loss else [])
    missing += [f"the '{t}' command" for t in tools if shutil.which(t) is None]
    if missing:
        raise NetnsUnavailable("real links (netns) need " + ", ".join(missing))


def owned(pid: int, index: int) -> Veth:
    """Names for the ``index``-th link of process ``pid`` (addresses filled by ``with_subnet``)."""
    if not 0 <= index < 16:
        raise ValueError("at most 16 links per run")
    ns = f"{PREFIX}{pid}-{index:x}"
    return Veth(ns, f"{ns}-h", f"{ns}-n", "", "")


def free_subnets(count: int) -> list[tuple[str, str]]:
    """``count`` (host, namespace) address pairs of /30s in ``SUBNET`` no interface uses yet."""
    used = {
        ipaddress.ip_interface(m).network
        for m in re.findall(r"inet (\S+)", sh("ip", "-o", "-4", "addr", "show"))
    }
    out: list[tuple[str, str]] = []
    blocks: list[ipaddress.IPv4Network] = list(SUBNET.subnets(new_prefix=30))
    # Start where this process's pid points: two runs starting at once pick different /30s.
    start = os.getpid() * 16 % len(blocks)
    for net in blocks[start:] + blocks[:start]:
        if any(net.overlaps(u) for u in used):
            continue
        hosts = list(net.hosts())
        out.append((str(hosts[0]), str(hosts[1])))
        if len(out) == count:
            return out
    raise SimError(f"no free /30 left in {SUBNET}")


def _leaf(dev_prefix: tuple[str, ...], dev: str, parent: str, shape: Shape, netem: bool) -> bool:
    """Add the leaf qdisc; netem with the delay when asked and the kernel has it. True if netem."""
    where = (*dev_prefix, "tc", "qdisc", "add", "dev", dev, *parent.split())
    if netem:
        delay = f"{shape.latency * 1000:.3f}ms"
        with contextlib.suppress(SimError):
            sh(*where, "netem", "delay", delay, "limit", str(max(shape.queue, 1000)))
            return True
    sh(*where, "pfifo", "limit", str(shape.queue))
    return False


def _same(end: int, got: bool, wanted: bool, veth: Veth) -> None:
    if end == 1 and got != wanted:
        raise SimError(f"netem worked on {veth.host_if} but not on {veth.ns_if}")


def create(veth: Veth, shape: Shape) -> ShapedLink:
    """Make the namespace, the veth pair, addresses, shaping and loss; undo all on failure.

    Raises:
        SimError: a command failed (what was made is removed first).
    """
    destroy(ShapedLink(veth, shape))  # a leftover of the same name (bench names are fixed)
    link = ShapedLink(veth, shape)
    try:
        sh("ip", "netns", "add", veth.ns)
        sh("ip", "link", "add", veth.host_if, "type", "veth", "peer", "name", veth.ns_if)
        sh("ip", "link", "set", veth.ns_if, "netns", veth.ns)
        inside: tuple[str, ...] = ("ip", "netns", "exec", veth.ns)
        sh("ip", "addr", "add", f"{veth.host_ip}/{veth.prefix}", "dev", veth.host_if)
        sh(*inside, "ip", "addr", "add", f"{veth.ns_ip}/{veth.prefix}", "dev", veth.ns_if)
        for prefix, dev in (((), veth.host_if), (inside, veth.ns_if)):
            if shape.per_packet:
                sh(*prefix, "ip", "link", "set", "dev", dev, "gso_max_segs", "1")
            sh(*prefix, "ip", "link", "set", dev, "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        netem = shape.latency > 0
        ends: tuple[tuple[tuple[str, ...], str], ...] = (((), veth.host_if), (inside, veth.ns_if))
        for end, (prefix, dev) in enumerate(ends):
            if shape.rate_bps is not None:
                sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                   "default", "10")
                rate = f"{shape.rate_bps}bit"
                sh(*prefix, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10",
                   "htb", "rate", rate, "ceil", rate, "burst", shape.burst)
                got = _leaf(prefix, dev, "parent 1:10 handle 10:", shape, netem)
            else:
                got = netem and _leaf(prefix, dev, "root handle 1:", shape, netem)
            # A one-sided delay would halve the round trip: both ends or neither.
            _same(end, got, netem, veth)
            netem = got
        link.latency_by = "netem" if netem else "none"
        drop = ("-m", "statistic", "--mode", "random")
        if shape.loss > 0:
            # Only what crosses the veth: the namespace's own loopback is not the WAN.
            sh(*inside, "iptables", "-A", "INPUT", "-i", veth.ns_if, *drop, "--probability",
               str(shape.loss), "-j", "DROP")
        if shape.uplink_loss > 0:
            rule = ("INPUT", "-i", veth.host_if, *drop, "--probability", str(shape.uplink_loss),
                    "-j", "DROP")
            sh("iptables", "-A", *rule)
            link.root_rules.append(rule)
    except BaseException:
        destroy(link)
        raise
    return link


def destroy(link: ShapedLink) -> None:
    """Remove the namespace (its veth end goes with it), the host end, root rules; never raises."""
    v = link.veth
    with contextlib.suppress(Exception):
        sh("ip", "netns", "del", v.ns, check=False)
    with contextlib.suppress(Exception):
        sh("ip", "link", "del", v.host_if, check=False)
    for rule in link.root_rules:
        with contextlib.suppress(Exception):
            sh("iptables", "-D", *rule, check=False)
    link.root_rules.clear()


def exists(ns: str) -> bool:
    """Whether a namespace of that name exists."""
    return ns in namespaces()


def namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces and interfaces whose name starts with ``prefix`` (tests: nothing left)."""
    links = _link_names()
    return [n for n in [*namespaces(), *links] if n.startswith(prefix)]


def _link_names() -> list[str]:
    return re.findall(r"^\d+: ([^:@\s]+)", sh("ip", "-o", "link", "show"), flags=re.MULTILINE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Remove what runs that died without cleaning up left (owner pid gone); returns the names."""
    removed: list[str] = []
    links = _link_names()
    ends = (n.removesuffix("-h").removesuffix("-n") for n in links)
    for name in sorted({*namespaces(), *ends}):
        m = _OWNED.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        destroy(ShapedLink(Veth(name, f"{name}-h", f"{name}-n", "", ""), Shape()))
        removed.append(name)
    for line in sh("iptables", "-S", "INPUT", check=False).splitlines():
        m = re.search(rf"-i ({PREFIX}(\d+)-[0-9a-f]-h) ", line)
        if m and line.startswith("-A ") and not _alive(int(m.group(2))):
            sh("iptables", "-D", *line.split()[1:], check=False)
            removed.append(f"iptables rule on {m.group(1)}")
    return removed


def host_bytes(dev: str) -> tuple[int, int]:
    """(rx, tx) byte counters of an interface of the root namespace."""
    base = Path("/sys/class/net") / dev / "statistics"
    return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())


def enter(ns: str) -> None:
    """Move the calling thread (and threads it starts later) into namespace ``ns``.

    What ``ip netns exec`` does before it runs a program, for a process that is already running
    (a simulator worker, before it opens any socket). Python 3.11 has no ``os.setns``.

    Raises:
        OSError: the namespace does not exist or ``setns`` was refused.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with Path(f"/run/netns/{ns}").open("rb") as fh:
        if libc.setns(fh.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")


@contextlib.contextmanager
def shaped_netns(
    name: str,
    host_ip: str,
    ns_ip: str,
    *,
    rate_kbit: int,
    loss: float = 0.0,
    burst: str = "15k",
    queue: int = 30,
) -> Iterator[str]:
    """The benchmarks' link: ``name`` with ``<name>-h``/``<name>-n``, /24, htb both ways.

    Loss on the downlink only and GSO left on, as the benchmark figures were measured.
    """
    shape = Shape(rate_bps=rate_kbit * 1000, loss=loss, burst=burst, queue=queue,
                  per_packet=False)
    link = create(Veth(name, f"{name}-h", f"{name}-n", host_ip, ns_ip, prefix=24), shape)
    try:
        yield name
    finally:
        destroy(link)
