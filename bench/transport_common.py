"""Shared plumbing for the transport benchmarks: shaped links, an in-memory source.

The namespaces and shaped veth pairs come from ``simulator.netns`` (the simulator's real links
use the same code); ``shaped_netns`` is re-exported here for the benchmarks.
"""

# ruff: noqa: PLC0415, ARG002 - children import lazily; callback signatures are fixed
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from simulator.netns import sh, shaped_netns

__all__ = [
    "MemoryChunks",
    "NullInbox",
    "StoreChunks",
    "cpu_seconds",
    "iface_bytes",
    "sh",
    "shaped_netns",
    "wait_port",
]


def iface_bytes(ns: str, dev: str) -> tuple[int, int]:
    """(rx, tx) byte counters of an interface inside a namespace."""
    base = Path("/sys/class/net") / dev / "statistics"
    out = sh("ip", "netns", "exec", ns, "cat", str(base / "rx_bytes"), str(base / "tx_bytes"))
    rx, tx = out.split()
    return int(rx), int(tx)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (``/proc/<pid>/stat``).

    Benchmarks on the shared 2-core box report CPU per chunk beside the throughput: wall-clock
    rates swing with other people's jobs, CPU seconds per message much less.
    """
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


class StoreChunks(MemoryChunks):
    """The same chunks, read back from a real ``ChunkStore`` on every request.

    What the controller's ``ReleaseStore.resolve_chunk`` does per served chunk: a hit in the
    store's verified-chunk LRU (``cache_bytes``, the controller's default 64 MiB), else open,
    read and re-hash the chunk file.
    """

    def __init__(self, root: Path, bundle_id: str, n: int, size: int, cache_bytes: int = 0) -> None:
        from firmware_bundles.chunkstore import ChunkStore

        super().__init__(bundle_id, n, size)
        self.store = ChunkStore(root, cache_bytes=cache_bytes)
        self.digests = [self.store.put(d) for d in self.data]

    def resolve_chunk(self, device_id: str, bundle_id: str, index: int) -> bytes | None:
        if bundle_id != self.bundle_id or index >= len(self.digests):
            return None
        return self.store.get(self.digests[index])


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
