"""Agent footprint: idle RSS and CPU, RSS while applying a 1 GiB image, slot write vs dd.

    .venv/bin/python bench/agent_footprint.py [--size-mib 1024] [--idle-seconds 10] [--out FILE]

1. Idle: ``slotline agent run`` (the real daemon: MQTT transport to the local Mosquitto at
   127.0.0.1:1883, file slots, file boot env) is started; after it settles, RSS and the CPU
   time it uses over ``--idle-seconds`` are read from /proc.
2. Apply: a signed full ``.slb`` of a ``--size-mib`` image (built from a few distinct 4 MiB chunks,
   tiled, so building it takes seconds) is installed with ``slotline agent install``; peak RSS
   of that process (ru_maxrss) and the wall time are recorded.
3. Throughput: 1 GiB written to a file slot through ``FileSlots`` (4 MiB writes, one fsync at the
   end, as the agent's checkpoints do) against ``dd bs=4M conv=fsync`` to the same file system.

Writes a Markdown table to stdout (and to ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.adapters.bootenv import DEFAULT_ENV, RedundantEnv
from agent.adapters.slots import FileSlots
from agent.core.states import BootSlot
from firmware_bundles.bundle import sign_manifest
from firmware_bundles.commands import Action, sign_command
from firmware_bundles.delta import encode_full
from firmware_bundles.keys import SigningKey
from firmware_bundles.manifest import CODEC_ID, ChunkEntry, ImageRef, Manifest, Payload, PayloadKind
from firmware_bundles.protocol import Channel, device_topic
from firmware_bundles.slb import write_slb
from firmware_bundles.trust import Role, make_root, sign_root

MIB = 1 << 20
CHUNK = 4 * MIB
KEYS = [SigningKey.from_seed(bytes([i]) * 32) for i in range(21, 24)]
SLOTLINE = str(Path(sys.executable).with_name("slotline"))


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


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of the process


def _config(d: Path, slot_size: int, factory_size: int, mqtt: bool) -> Path:
    cfg = d / "agent.toml"
    text = f"""
[device]
id = "bench-1"
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


def _bundle(d: Path, size: int) -> Path:
    """A signed full .slb of ``size`` bytes tiled from 4 distinct 4 MiB chunks."""
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
    entries = tuple(
        ChunkEntry(len(distinct[k % 4][1]), hashlib.sha256(distinct[k % 4][1]).hexdigest(), CHUNK)
        for k in range(n)
    )
    now = int(time.time())
    manifest = Manifest(
        bundle_id="bench-2.0",
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
    out = d / "big.slb"
    with out.open("wb") as f:
        write_slb(
            f, sign_manifest(manifest, [KEYS[1]]), None, (distinct[k % 4][1] for k in range(n))
        )
    return out


def bench_idle(d: Path, seconds: float) -> dict[str, float]:
    cfg = _config(d, 64 * MIB, MIB, mqtt=True)
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
        # one signed command (for another device: verified, then refused) loads the verifier
        cmd = sign_command(
            [KEYS[2]],
            device="someone-else",
            counter=1,
            action=Action.CANCEL,
            args={},
            issued=int(time.time()),
        )
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
                device_topic("bench-1", Channel.CMD),
                "-s",
            ],
            input=cmd,
            check=True,
        )
        time.sleep(1.0)
        after = _sample(proc.pid, seconds)
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
        "idle_rss_after_command_mib": after[0],
        "idle_cpu_after_command_percent": after[1],
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
    cfg = _config(d, size + 64 * MIB, MIB, mqtt=False)
    t = time.monotonic()
    out = d / "install.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [SLOTLINE, "agent", "install", str(slb), "--config", str(cfg)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        # VmHWM of the child itself (ru_maxrss of children would count the pre-exec fork of
        # this fat benchmark process). Sampled until exit; the last reading is the peak.
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _status_kib(proc.pid, "VmHWM:"))
            time.sleep(0.01)
    elapsed = time.monotonic() - t
    text = out.read_text()
    if proc.returncode != 0 or "staged" not in text:
        raise RuntimeError(f"install failed: {text[-2000:]}")
    return {
        "apply_peak_rss_mib": peak / 1024,
        "apply_seconds": elapsed,
        "apply_mib_s": size / MIB / elapsed,
        "slb_mib": slb.stat().st_size / MIB,
    }


def bench_write(d: Path, size: int) -> dict[str, float]:
    block = os.urandom(CHUNK)
    a, b = d / "wa.img", d / "wb.img"
    a.write_bytes(b"")
    slots = FileSlots(str(a), str(b), booted=BootSlot.A, capacity=size)
    t = time.monotonic()
    for off in range(0, size, CHUNK):
        slots.write(BootSlot.B, off, block)
    slots.sync(BootSlot.B)
    ours = time.monotonic() - t
    slots.close()
    b.unlink()
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
    dd = time.monotonic() - t
    (d / "dd.img").unlink()
    return {
        "slot_write_mib_s": size / MIB / ours,
        "dd_mib_s": size / MIB / dd,
        "slot_vs_dd": dd / ours,
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
            ("idle", lambda d: bench_idle(d, args.idle_seconds)),
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
    rows = [
        (
            "agent idle RSS (`slotline agent run`, MQTT connected)",
            f"{results['idle_rss_mib']:.1f} MiB",
            "<= 35 MiB",
        ),
        (
            f"agent idle CPU over {results['idle_seconds']:.0f} s",
            f"{results['idle_cpu_percent']:.2f} %",
            "~0 (no polling)",
        ),
        (
            "agent idle RSS after verifying one signed command (verifier loaded)",
            f"{results['idle_rss_after_command_mib']:.1f} MiB",
            "<= 35 MiB",
        ),
        (
            f"agent idle CPU over {results['idle_seconds']:.0f} s after that command",
            f"{results['idle_cpu_after_command_percent']:.2f} %",
            "~0",
        ),
        (
            f"peak RSS applying a {args.size_mib} MiB image (`slotline agent install`)",
            f"{results['apply_peak_rss_mib']:.1f} MiB",
            "<= 64 MiB",
        ),
        (
            "apply wall time (verify, decode, write, read back)",
            f"{results['apply_seconds']:.1f} s ({results['apply_mib_s']:.0f} MiB/s)",
            "",
        ),
        ("file-slot write (4 MiB writes + fsync)", f"{results['slot_write_mib_s']:.0f} MiB/s", ""),
        ("dd bs=4M conv=fsync, same file system", f"{results['dd_mib_s']:.0f} MiB/s", ""),
        ("file-slot / dd", f"{100 * results['slot_vs_dd']:.0f} %", ">= 80 %"),
    ]
    table = "| measure | result | target |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
