"""Agent footprint: the daemon idle and applying over MQTT, the offline installer, slot write vs dd.

    .venv/bin/python bench/agent_footprint.py [--size-mib 1024] [--idle-seconds 10] [--out FILE]

1. Daemon: ``slotline agent run`` (the real daemon: MQTT transport to the local Mosquitto at
   127.0.0.1:1883, file slots, file boot env; a fresh device id per run) is started; after it
   settles, RSS and the CPU time it uses over ``--idle-seconds`` are read from /proc. Then a
   signed install of a ``--size-mib`` image is published to it and this process serves the
   chunks (``ChunkServer``, as the controller's gateway does). The release's target digest is
   deliberately wrong, so the whole image is fetched, decoded, written and read back and the
   install then fails at the read-back check instead of rebooting this machine. A third of the
   way in, a rollback is sent (verified by a child while the daemon applies, then refused as
   ``agent.busy``): the worst case of daemon plus child. After the install a cancel follows (a
   third verified command), then idle RSS and CPU are read again. During the
   install a sampler thread reads every 10 ms the RSS of the daemon and of each child it
   spawns (the command-verifier children, ``agent/verify_child.py``): their peaks and the
   largest sum at one instant are reported, as RSS and as PSS (RSS counts the pages the two
   processes share, the interpreter and libc, twice; PSS splits them).
2. Offline apply: a signed full ``.slb`` of the same size (built from a few distinct 4 MiB
   chunks, tiled, so building it takes seconds) is installed with ``slotline agent install``;
   its peak RSS (VmHWM, sampled until exit) and the wall time are recorded.
3. Throughput: 1 GiB written to a file slot through ``FileSlots`` (4 MiB writes, one fsync at the
   end, as the agent's checkpoints do) against ``dd bs=4M conv=fsync`` to the same file system,
   alternating three times; the best of each is compared (the shared disk is noisy).

Writes a Markdown table to stdout (and to ``--out``). ``BENCH_FETCH_WINDOW=N`` in the environment
sets the daemon's ``[update] fetch_window`` (default 4, the agent's own default).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from agent.adapters.bootenv import DEFAULT_ENV, RedundantEnv
from agent.adapters.slots import FileSlots
from agent.core.states import BootSlot
from firmware_bundles.bundle import sign_manifest
from firmware_bundles.commands import Action, sign_command
from firmware_bundles.delta import encode_full
from firmware_bundles.keys import SigningKey
from firmware_bundles.manifest import CODEC_ID, ChunkEntry, ImageRef, Manifest, Payload, PayloadKind
from firmware_bundles.protocol import Channel, device_topic, parse_topic
from firmware_bundles.slb import write_slb
from firmware_bundles.trust import Role, make_root, sign_root

MIB = 1 << 20
CHUNK = 4 * MIB
KEYS = [SigningKey.from_seed(bytes([i]) * 32) for i in range(21, 24)]
SLOTLINE = str(Path(sys.executable).with_name("slotline"))
FETCH_WINDOW = int(os.environ.get("BENCH_FETCH_WINDOW", "4"))  # the agent's default


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS:")


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of the process


def _config(d: Path, slot_size: int, factory_size: int, mqtt: bool, device: str) -> Path:
    cfg = d / "agent.toml"
    text = f"""
[device]
id = "{device}"
hardware = "board-x"
factory_version = "1.0"
factory_size = {factory_size}
[trust]
root = "{d / "trust.json"}"
[slots]
kind = "file"
a = "{d / "a.img"}"
b = "{d / "b.img"}"
size = {slot_size}
booted = "env"
[bootenv]
kind = "file"
path = "{d / "uboot.env"}"
[journal]
path = "{d / "state" / "journal.json"}"
[update]
checkpoint_mib = 16
fetch_window = {FETCH_WINDOW}
"""
    if mqtt:
        text += '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n'
    cfg.write_text(text)
    return cfg


def _device(d: Path, slot_size: int) -> int:
    now = int(time.time())
    root = make_root(
        version=1,
        expires=now + 10**6,
        role_keys={
            Role.ROOT: [KEYS[0].public],
            Role.RELEASE: [KEYS[1].public],
            Role.COMMAND: [KEYS[2].public],
        },
    )
    (d / "trust.json").write_bytes(sign_root(root, [KEYS[0]]))
    factory = os.urandom(MIB)
    with (d / "a.img").open("wb") as f:
        f.write(factory)
        f.truncate(slot_size)
    RedundantEnv(str(d / "uboot.env")).write(dict(DEFAULT_ENV))
    return len(factory)


@dataclass(frozen=True)
class _Image:
    """A ``size``-byte image tiled from 4 distinct 4 MiB chunks, and its signed manifest."""

    chunks: list[bytes]  # the encoded chunk of each tile
    manifest: Manifest


def _image(d: Path, size: int, *, wrong_target: bool = False) -> _Image:
    distinct = []
    for i in range(4):
        raw = hashlib.sha256(b"%d" % i).digest() * (MIB // 32) + os.urandom(MIB) + b"\0" * 2 * MIB
        p = d / f"tile{i}.img"
        p.write_bytes(raw)
        (c,) = list(encode_full(p, chunk_out_size=CHUNK))
        distinct.append((raw, c.data))
        p.unlink()
    n = size // CHUNK
    sha = hashlib.sha256()
    for k in range(n):
        sha.update(distinct[k % 4][0])
    if wrong_target:  # read back fails: the install ends without a reboot
        sha.update(b"not this image")
    entries = tuple(
        ChunkEntry(len(distinct[k % 4][1]), hashlib.sha256(distinct[k % 4][1]).hexdigest(), CHUNK)
        for k in range(n)
    )
    now = int(time.time())
    manifest = Manifest(
        bundle_id=f"bench-2.0-{uuid.uuid4().hex[:8]}",
        component="rootfs",
        version="2.0",
        security_version=1,
        hardware=("board-x",),
        target=ImageRef(size=n * CHUNK, sha256=sha.hexdigest()),
        payload=Payload(kind=PayloadKind.FULL, base=None, codec=CODEC_ID, chunks=entries),
        requires=(),
        notes="",
        created=now,
        expires=now + 86400,
    )
    return _Image([c for _, c in distinct], manifest)


def _bundle(d: Path, size: int) -> Path:
    """A signed full .slb of ``size`` bytes tiled from 4 distinct 4 MiB chunks."""
    img = _image(d, size)
    out = d / "big.slb"
    n = len(img.manifest.payload.chunks)
    with out.open("wb") as f:
        write_slb(
            f, sign_manifest(img.manifest, [KEYS[1]]), None, (img.chunks[k % 4] for k in range(n))
        )
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    """Children that have exec'd: between fork and exec a child shows its parent's memory."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    parent = _cmdline(pid)
    return [int(c) for c in text.split() if _cmdline(int(c)) not in (parent, b"")]


@dataclass
class _Sampler:
    """Every 10 ms: RSS of a process and of its children; peaks and the largest sum (KiB)."""

    pid: int
    daemon_peak: int = 0
    child_peak: int = 0
    sum_peak: int = 0
    sum_pss_peak: int = 0  # PSS of the process and its children, while it has one
    children_seen: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.daemon_peak = max(self.daemon_peak, _status_kib(self.pid, "VmHWM:"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.daemon_peak = max(self.daemon_peak, _status_kib(self.pid, "VmHWM:"))
            total = _rss_kib(self.pid)
            children = _children(self.pid)
            for c in children:
                self.children_seen.add(c)
                # VmHWM: the child's own peak so far (it may exit before the next sample)
                self.child_peak = max(self.child_peak, _status_kib(c, "VmHWM:"))
                total += _rss_kib(c)
            self.sum_peak = max(self.sum_peak, total)
            if children:
                pss = _pss_kib(self.pid) + sum(_pss_kib(c) for c in children)
                self.sum_pss_peak = max(self.sum_pss_peak, pss)
            time.sleep(0.01)


def _mqtt_pub(topic: str, payload: bytes) -> None:
    subprocess.run(
        [
            "mosquitto_pub",
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-t",
            topic,
            "-s",
        ],
        input=payload,
        check=True,
    )


def _command(device: str, counter: int, action: Action, args: dict[str, Any]) -> bytes:
    return sign_command(
        [KEYS[2]], device=device, counter=counter, action=action, args=args, issued=int(time.time())
    )


async def _serve_install(
    device: str, img: _Image, deadline: float
) -> tuple[dict[str, Any], list[str]]:
    """Publish a signed install to ``device`` and serve its chunks; a third of the way in, send a
    rollback (verified by a child while the daemon applies, then refused as busy). Returns the
    final state document and the error codes of the device's events."""
    from agent.adapters.mqtt import SystemClock  # noqa: PLC0415
    from agent.transport.aioclient import AsyncMqttClient, MqttSettings  # noqa: PLC0415
    from agent.transport.serving import ChunkServer  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    subscribed = asyncio.Event()
    codes: list[str] = []

    def on_message(topic: str, payload: bytes, _retained: bool) -> None:
        dev, channel = parse_topic(topic)
        if channel is Channel.FETCH:
            server.on_fetch(dev, payload)
        elif channel is Channel.EVENTS:
            code = json.loads(payload).get("code")
            if code:
                codes.append(str(code))
        elif channel is Channel.STATE and not done.done():
            doc = json.loads(payload)
            r = doc.get("last_result") or {}
            if r.get("outcome") in ("failed", "rejected") and not doc.get("update"):
                done.set_result(doc)

    def on_connect(_session: bool) -> None:
        async def sub() -> None:
            channels = (Channel.FETCH, Channel.STATE, Channel.EVENTS)
            await client.subscribe([(device_topic(device, ch), 1) for ch in channels])
            subscribed.set()

        loop.create_task(sub())  # noqa: RUF006 - awaited through `subscribed`

    n = len(img.manifest.payload.chunks)
    served = 0

    async def resolve(_dev: str, bundle_id: str, index: int) -> bytes | None:
        nonlocal served
        if bundle_id != img.manifest.bundle_id or not 0 <= index < n:
            return None
        served += 1
        if served == max(1, n // 3):
            rollback = _command(device, 2, Action.ROLLBACK, {})
            client.publish(device_topic(device, Channel.CMD), rollback)
        return img.chunks[index % 4]

    client = AsyncMqttClient(
        MqttSettings.from_url("mqtt://127.0.0.1:1883", f"{device}-server"),
        on_message=on_message,
        on_connect=on_connect,
    )
    server = ChunkServer(client, resolve, site_of=lambda _d: None, clock=SystemClock())
    await client.start()
    server.start()
    try:
        await asyncio.wait_for(subscribed.wait(), 30)
        manifest = json.loads(sign_manifest(img.manifest, [KEYS[1]]))
        install = _command(
            device, 1, Action.INSTALL, {"bundle_id": img.manifest.bundle_id, "manifest": manifest}
        )
        client.publish(device_topic(device, Channel.CMD), install)
        doc = await asyncio.wait_for(done, deadline)
        await asyncio.sleep(0.5)  # the events published with the final state
        return doc, codes
    finally:
        await server.stop()
        await client.stop()


def bench_daemon(d: Path, seconds: float, size: int) -> dict[str, float]:
    device = f"bench-{uuid.uuid4().hex[:8]}"  # the broker keeps retained state of earlier runs
    cfg = _config(d, size + 64 * MIB, MIB, mqtt=True, device=device)
    img = _image(d, size, wrong_target=True)
    proc = subprocess.Popen(
        [SLOTLINE, "agent", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(3.0)  # start-up: imports, journal, first state publish
        if proc.poll() is not None:
            raise RuntimeError(f"agent run exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        first = _sample(proc.pid, seconds)
        t = time.monotonic()
        with _Sampler(proc.pid) as sampler:
            doc, codes = asyncio.run(_serve_install(device, img, deadline=900.0))
        elapsed = time.monotonic() - t
        code = (doc.get("last_result") or {}).get("code")
        if code != "bundle.digest_mismatch":  # anything else: the apply did not run through
            raise RuntimeError(f"network install ended with {doc}")
        if "agent.busy" not in codes:  # the mid-apply rollback was verified, then refused
            raise RuntimeError(f"mid-apply command not seen refused as busy: {codes}")
        # a third verified command (nothing to cancel: refused by the state machine)
        cancel = _command(device, 3, Action.CANCEL, {})
        with _Sampler(proc.pid) as cancel_sampler:
            _mqtt_pub(device_topic(device, Channel.CMD), cancel)
            time.sleep(3.0)
        after = _sample(proc.pid, seconds)
        if proc.poll() is not None:
            raise RuntimeError(f"agent run exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "idle_rss_mib": first[0],
        "idle_cpu_percent": first[1],
        "idle_seconds": seconds,
        "net_daemon_peak_mib": sampler.daemon_peak / 1024,
        "net_child_peak_mib": max(sampler.child_peak, cancel_sampler.child_peak) / 1024,
        "net_sum_peak_mib": sampler.sum_peak / 1024,
        "net_sum_pss_peak_mib": sampler.sum_pss_peak / 1024,
        "net_children": len(sampler.children_seen | cancel_sampler.children_seen),
        "net_seconds": elapsed,
        "net_mib_s": size / MIB / elapsed,
        "idle_rss_after_mib": after[0],
        "idle_cpu_after_percent": after[1],
    }


def _sample(pid: int, seconds: float) -> tuple[float, float]:
    """Max RSS (MiB) and CPU % of ``pid`` over ``seconds``."""
    t0, c0 = time.monotonic(), _cpu_ticks(pid)
    rss = []
    while time.monotonic() - t0 < seconds:
        rss.append(_rss_kib(pid))
        time.sleep(0.5)
    ticks = _cpu_ticks(pid) - c0
    elapsed = time.monotonic() - t0
    return max(rss) / 1024, 100.0 * ticks / os.sysconf("SC_CLK_TCK") / elapsed


def bench_apply(d: Path, size: int) -> dict[str, float]:
    slb = _bundle(d, size)
    cfg = _config(d, size + 64 * MIB, MIB, mqtt=False, device="bench-offline")
    t = time.monotonic()
    out = d / "install.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [SLOTLINE, "agent", "install", str(slb), "--config", str(cfg)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        # VmHWM of the installer itself (ru_maxrss of children would count the pre-exec fork
        # of this fat benchmark process), sampled until exit, and of any child it spawns.
        with _Sampler(proc.pid) as sampler:
            proc.wait()
    elapsed = time.monotonic() - t
    text = out.read_text()
    if proc.returncode != 0 or "staged" not in text:
        raise RuntimeError(f"install failed: {text[-2000:]}")
    return {
        "apply_peak_rss_mib": sampler.daemon_peak / 1024,
        "apply_children": len(sampler.children_seen),
        "apply_seconds": elapsed,
        "apply_mib_s": size / MIB / elapsed,
        "slb_mib": slb.stat().st_size / MIB,
    }


def _slot_write(d: Path, size: int, block: bytes) -> float:
    a, b = d / "wa.img", d / "wb.img"
    a.write_bytes(b"")
    slots = FileSlots(str(a), str(b), booted=BootSlot.A, capacity=size)
    t = time.monotonic()
    for off in range(0, size, CHUNK):
        slots.write(BootSlot.B, off, block)
    slots.sync(BootSlot.B)
    elapsed = time.monotonic() - t
    slots.close()
    b.unlink()
    return elapsed


def _dd(d: Path, size: int) -> float:
    # dd straight from /dev/zero (no pipe in front of it: the fastest dd can write this fs)
    t = time.monotonic()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={d / 'dd.img'}",
            "bs=4M",
            f"count={size // CHUNK}",
            "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    elapsed = time.monotonic() - t
    (d / "dd.img").unlink()
    return elapsed


def bench_write(d: Path, size: int, rounds: int = 3) -> dict[str, float]:
    """Slot writer and dd alternating, ``rounds`` times each (this VM's disk is shared and
    noisy: one pair can differ 3x); the best of each is compared."""
    block = os.urandom(CHUNK)
    ours, dd = [], []
    for r in range(rounds):
        pair = (lambda: ours.append(_slot_write(d, size, block)), lambda: dd.append(_dd(d, size)))
        for run in pair if r % 2 == 0 else reversed(pair):
            run()
    ratios = sorted(o_dd / o for o, o_dd in zip(ours, dd, strict=True))
    return {
        "slot_write_mib_s": size / MIB / min(ours),
        "dd_mib_s": size / MIB / min(dd),
        "slot_vs_dd": min(dd) / min(ours),
        "slot_vs_dd_low": ratios[0],
        "slot_vs_dd_high": ratios[-1],
        "write_rounds": rounds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    size = args.size_mib * MIB
    results: dict[str, float] = {}
    base = Path(tempfile.mkdtemp(prefix="slotline-bench-", dir="/var/tmp"))
    try:
        for name, fn in (
            ("daemon", lambda d: bench_daemon(d, args.idle_seconds, size)),
            ("apply", lambda d: bench_apply(d, size)),
            ("write", lambda d: bench_write(d, size)),
        ):
            d = base / name
            d.mkdir()
            _device(d, size + 64 * MIB)
            print(f"running {name}...", file=sys.stderr)
            results.update(fn(d))
            shutil.rmtree(d)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    mib = args.size_mib
    rows = [
        (
            "daemon idle RSS (`slotline agent run`, MQTT connected, before any command)",
            f"{results['idle_rss_mib']:.1f} MiB",
            "<= 35 MiB",
        ),
        (
            f"daemon idle CPU over {results['idle_seconds']:.0f} s",
            f"{results['idle_cpu_percent']:.2f} %",
            "~0 (no polling)",
        ),
        (
            f"daemon peak RSS over a {mib} MiB install over MQTT (fetch, decode, write, read back)",
            f"{results['net_daemon_peak_mib']:.1f} MiB",
            "<= 64 MiB",
        ),
        (
            f"verifier child peak RSS ({results['net_children']:.0f} children, one per command)",
            f"{results['net_child_peak_mib']:.1f} MiB",
            "",
        ),
        (
            "daemon + verifier child, largest sum at one instant during that install, RSS (PSS)",
            f"{results['net_sum_peak_mib']:.1f} MiB ({results['net_sum_pss_peak_mib']:.1f} MiB)",
            "",
        ),
        (
            "network install wall time (ends at the read-back check, see notes)",
            f"{results['net_seconds']:.1f} s ({results['net_mib_s']:.0f} MiB/s)",
            "",
        ),
        (
            "daemon idle RSS after that install and a third verified command",
            f"{results['idle_rss_after_mib']:.1f} MiB",
            "<= 35 MiB",
        ),
        (
            f"daemon idle CPU over {results['idle_seconds']:.0f} s after them",
            f"{results['idle_cpu_after_percent']:.2f} %",
            "~0",
        ),
        (
            (
                f"peak RSS of `slotline agent install` applying a {mib} MiB .slb "
                f"({results['apply_children']:.0f} children)"
            ),
            f"{results['apply_peak_rss_mib']:.1f} MiB",
            "<= 64 MiB",
        ),
        (
            "offline apply wall time (verify, decode, write, read back)",
            f"{results['apply_seconds']:.1f} s ({results['apply_mib_s']:.0f} MiB/s)",
            "",
        ),
        (
            f"file-slot write (4 MiB writes + fsync), best of {results['write_rounds']:.0f}",
            f"{results['slot_write_mib_s']:.0f} MiB/s",
            "",
        ),
        (
            f"dd bs=4M conv=fsync, same file system, best of {results['write_rounds']:.0f}",
            f"{results['dd_mib_s']:.0f} MiB/s",
            "",
        ),
        (
            "file-slot / dd (best / best; range of the alternating pairs)",
            (
                f"{100 * results['slot_vs_dd']:.0f} % ({100 * results['slot_vs_dd_low']:.0f}-"
                f"{100 * results['slot_vs_dd_high']:.0f} %)"
            ),
            ">= 80 %",
        ),
    ]
    table = "| measure | result | target |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
