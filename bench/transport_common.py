"""Shared plumbing for the transport benchmarks: namespaces, shaped links, an in-memory source.

Run as root. Every namespace created here is deleted in ``finally`` (deleting it removes the veth).
"""

# ruff: noqa: PLC0415, ARG002 - children import lazily; callback signatures are fixed
from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


@contextlib.contextmanager
def shaped_netns(
    name: str,
    host_ip: str,
    ns_ip: str,
    *,
    rate_kbit: int,
    loss: float = 0.0,
    burst: str = "15k",
    leaf: tuple[str, ...] = ("pfifo", "limit", "30"),
) -> Iterator[str]:
    """A namespace joined to the root namespace by a veth pair shaped with htb both ways.

    Loss is dropped on input in the namespace with iptables statistic (no netem here).
    """
    host_if, ns_if = f"{name}-h", f"{name}-n"
    sh("ip", "netns", "del", name, check=False)
    sh("ip", "link", "del", host_if, check=False)
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", name)
        sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        sh("ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        for prefix, dev in ((), host_if), (("ip", "netns", "exec", name), ns_if):
            sh(
                *prefix,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "handle",
                "1:",
                "htb",
                "default",
                "10",
            )
            sh(
                *prefix,
                "tc",
                "class",
                "add",
                "dev",
                dev,
                "parent",
                "1:",
                "classid",
                "1:10",
                "htb",
                "rate",
                f"{rate_kbit}kbit",
                "ceil",
                f"{rate_kbit}kbit",
                "burst",
                burst,
            )
            # A short leaf FIFO (this kernel has no fq_codel/sfq): the default 1000-packet one
            # holds 6 s at 2 Mbit/s, a bufferbloat no site router should have.
            sh(*prefix, "tc", "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", *leaf)
        if loss > 0:
            sh(
                "ip",
                "netns",
                "exec",
                name,
                "iptables",
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                str(loss),
                "-j",
                "DROP",
            )
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", host_if, check=False)


def iface_bytes(ns: str, dev: str) -> tuple[int, int]:
    """(rx, tx) byte counters of an interface inside a namespace."""
    base = Path("/sys/class/net") / dev / "statistics"
    out = sh("ip", "netns", "exec", ns, "cat", str(base / "rx_bytes"), str(base / "tx_bytes"))
    rx, tx = out.split()
    return int(rx), int(tx)


class MemoryChunks:
    """A ChunkSource over in-memory chunks of one bundle."""

    def __init__(self, bundle_id: str, n: int, size: int, site: str | None = None) -> None:
        import os

        self.bundle_id = bundle_id
        self.data = [os.urandom(size) for _ in range(n)]
        self.site = site
        self.asked: list[tuple[str, int]] = []

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        self.asked.append((device_id, index))
        if bundle_id != self.bundle_id or index >= len(self.data):
            return None
        return self.data[index]

    def site_of(self, device_id: str) -> str | None:
        return self.site


class NullInbox:
    def __init__(self) -> None:
        self.events = 0

    def on_state(self, device_id, state) -> None:
        pass

    def on_event(self, device_id, event) -> None:
        self.events += 1

    def on_online(self, device_id, online) -> None:
        pass


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.3):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} not listening")
