"""Transport benchmarks on loopback: chunk serving vs raw Mosquitto, flood, resume.

    .venv/bin/python -m bench.transport_loopback serving [--devices 100 --chunks 20 --size 65536]
        [--rounds 3 --device-procs 1 --source memory|store --cache-mib 64]
    .venv/bin/python -m bench.transport_loopback flood [--healthy 20 --seconds 10]
    .venv/bin/python -m bench.transport_loopback resume [--cuts 5]

Each starts its own Mosquitto on a free port (generated config) and stops it at the end.
Devices run in a child process on one asyncio loop (agent/transport/aioclient.py); the server
side (gateway, or a raw publisher) in this process.
"""

# ruff: noqa: PLC0415, ARG001 - children import lazily; callback signatures are fixed
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.transport_common import MemoryChunks, NullInbox, StoreChunks, cpu_seconds


def _settings(port: int, cid: str):
    from agent.transport.aioclient import MqttSettings

    return MqttSettings(
        "127.0.0.1", port, cid, backoff_initial=0.1, backoff_max=1.0, max_inflight=64
    )


def _broker(tmp: Path):
    from agent.transport.broker import EmbeddedBroker

    return EmbeddedBroker.start_default(tmp, kind="mosquitto")


# ------------------------------------------------------------------------------- serving


def _tally(got: dict, size: int) -> None:
    """Count one received chunk; the first and last arrival times bound the transfer."""
    now = time.time()
    if got["n"] == 0:
        got["first"] = now
    got["n"] += 1
    got["bytes"] += size
    got["last"] = now


async def _raw_subscribers(port: int, first: int, devices: int, expect: int) -> dict:
    from agent.transport.aioclient import AsyncMqttClient
    from firmware_bundles import protocol as wire

    got = {"n": 0, "bytes": 0, "first": 0.0, "last": 0.0}
    done = asyncio.Event()

    def sink(topic: str, payload: bytes, retained: bool) -> None:
        _tally(got, len(payload))
        if got["n"] >= expect:
            done.set()

    clients = []
    for i in range(first, first + devices):
        c = AsyncMqttClient(_settings(port, f"raw-{i}"), on_message=sink)
        await c.start()
        clients.append(c)
    for c in clients:
        await c.wait_connected(10)
        await c.subscribe([(wire.device_topic(c.settings.client_id, wire.Channel.CHUNK), 1)])
    print("READY", flush=True)
    cpu0 = time.process_time()
    try:
        await asyncio.wait_for(done.wait(), 120)
    except TimeoutError:
        print(f"raw subscribers got {got['n']} of {expect}", file=sys.stderr, flush=True)
    got["cpu"] = time.process_time() - cpu0
    for c in clients:
        await c.stop()
    return got


async def _raw_publisher(port: int, devices: int, chunks: int, size: int) -> None:
    from agent.transport.aioclient import AsyncMqttClient
    from firmware_bundles import protocol as wire

    pub = AsyncMqttClient(_settings(port, "raw-pub"))
    await pub.start()
    await pub.wait_connected(10)
    # The same frame bytes the gateway sends (header + data), same QoS, same in-flight bound.
    payload = wire.encode_chunk(wire.ChunkFrame("b1", 0, data=bytes(size)))
    sem = asyncio.Semaphore(64)
    pending = []
    for _k in range(chunks):
        for i in range(devices):
            await sem.acquire()
            fut = pub.publish(wire.device_topic(f"raw-{i}", wire.Channel.CHUNK), payload)
            fut.add_done_callback(lambda _f: sem.release())
            pending.append(fut)
    await asyncio.gather(*pending, return_exceptions=True)
    await pub.stop()


async def _served_devices(port: int, first: int, devices: int, chunks: int) -> dict:
    from agent.adapters.mqtt import MqttTransport

    ts = [
        MqttTransport(f"dev-{i}", _settings(port, f"dev-{i}"), window=16)
        for i in range(first, first + devices)
    ]
    for t in ts:
        await t.start()
    ok = await asyncio.gather(*(t.reachable(30) for t in ts))
    assert all(ok)
    print("READY", flush=True)
    sys.stdin.readline()
    got = {"n": 0, "bytes": 0, "first": 0.0, "last": 0.0}

    async def fetch(t: MqttTransport) -> None:
        async for _, data in t.fetch_chunks("b1", list(range(chunks))):
            _tally(got, len(data))

    start = time.time()
    cpu0 = time.process_time()
    try:
        await asyncio.wait_for(asyncio.gather(*(fetch(t) for t in ts)), 120)
    except TimeoutError:
        stuck = [
            (t.device_id, t.stats.chunks, t.stats.re_requests, t.client.connected)
            for t in ts
            if t.stats.chunks < chunks
        ]
        print(f"served devices got {got['n']}; stuck: {stuck[:10]}", file=sys.stderr, flush=True)
    got["start"] = start
    got["cpu"] = time.process_time() - cpu0
    for t in ts:
        await t.stop()
    return got


def _child(role: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.transport_loopback", role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"child said {line!r}")


def _split(devices: int, procs: int) -> list[tuple[int, int]]:
    """(first, count) of each device process's share of the devices."""
    procs = max(1, min(procs, devices))
    cuts = [devices * k // procs for k in range(procs + 1)]
    return [(cuts[k], cuts[k + 1] - cuts[k]) for k in range(procs)]


def _merge(parts: list[dict]) -> dict:
    """One result from several device processes: counts summed, the span from first to last."""
    out = {
        "n": sum(p["n"] for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "first": min(p["first"] for p in parts if p["n"]),
        "last": max(p["last"] for p in parts),
        "cpu": sum(p["cpu"] for p in parts),
    }
    if all("start" in p for p in parts):
        out["start"] = min(p["start"] for p in parts)
    return out


def _results(procs: list[subprocess.Popen]) -> dict:
    return _merge(
        [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    )


def _raw_phase(broker, args, shares) -> tuple[float, dict[str, float]]:
    """One publisher, the gateway's frames, QoS1, round-robin to every subscriber."""
    subs = [
        _child("raw-sub", str(broker.port), str(first), str(n), str(n * args.chunks))
        for first, n in shares
    ]
    for sub in subs:
        _wait_ready(sub)
    t0, cpu0, bcpu0 = time.time(), time.process_time(), cpu_seconds(broker.proc.pid)
    asyncio.run(_raw_publisher(broker.port, args.devices, args.chunks, args.size))
    raw = _results(subs)
    cpu = {
        "sender": time.process_time() - cpu0,
        "receivers": raw["cpu"],
        "broker": cpu_seconds(broker.proc.pid) - bcpu0,
    }
    return raw["n"] * args.size / (raw["last"] - t0), cpu


def _served_phase(broker, args, shares, chunks) -> tuple[float, dict[str, float], int, int]:
    """Devices fetch every chunk through the gateway; (rate, CPU by party, bytes, fetches)."""
    from agent.transport.serving import ServingLimits
    from controller.gateway import GatewayLimits, MqttGateway

    devs = [
        _child("served-dev", str(broker.port), str(first), str(n), str(args.chunks))
        for first, n in shares
    ]

    async def gateway() -> dict:
        limits = GatewayLimits(serving=ServingLimits(max_unacked=64))
        gw = MqttGateway(
            _settings(broker.port, "controller"),
            NullInbox(),
            chunks,
            limits=limits,
            read_retained=False,
        )
        await gw.start()
        await gw.wait_ready()
        loop = asyncio.get_running_loop()
        for dev in devs:
            await loop.run_in_executor(None, _wait_ready, dev)
        cpu0, bcpu0 = time.process_time(), cpu_seconds(broker.proc.pid)
        for dev in devs:
            dev.stdin.write("go\n")
            dev.stdin.flush()
        result = await loop.run_in_executor(None, _results, devs)
        cpu = {"sender": time.process_time() - cpu0}
        cpu["broker"] = cpu_seconds(broker.proc.pid) - bcpu0
        requests = gw.serving_stats.requests
        await gw.stop()
        result["cpu"] = {**cpu, "receivers": result["cpu"]}
        result["fetches"] = requests
        return result

    served = asyncio.run(gateway())
    rate = served["bytes"] / (served["last"] - served["start"])
    return rate, served["cpu"], served["bytes"], served["fetches"]


def serving(args) -> dict:
    total = args.devices * args.chunks * args.size
    shares = _split(args.devices, args.device_procs)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        chunks = (
            StoreChunks(
                Path(tmp) / "chunks", "b1", args.chunks, args.size, args.cache_mib * 1024**2
            )
            if args.source == "store"
            else MemoryChunks("b1", args.chunks, args.size)
        )
        broker = _broker(Path(tmp))
        try:
            # Raw and served alternate, so a neighbour's job on this shared machine lands on
            # both sides of at least one pair; each pair's ratio is reported, and the median.
            for _ in range(args.rounds):
                raw_rate, raw_cpu = _raw_phase(broker, args, shares)
                served_rate, served_cpu, got, fetches = _served_phase(
                    broker, args, shares, chunks
                )
                rounds.append(
                    {
                        "raw_MBps": round(raw_rate / 1e6, 1),
                        "served_MBps": round(served_rate / 1e6, 1),
                        "ratio": round(served_rate / raw_rate, 3),
                        "served_complete": got == total,
                        # fetch messages the gateway took in (pings included)
                        "fetch_requests": fetches,
                        # CPU microseconds per chunk by party (sender = raw publisher or
                        # gateway): steadier than MB/s here, and it says who does the work.
                        "raw_cpu_us_per_chunk": _per_chunk(raw_cpu, args),
                        "served_cpu_us_per_chunk": _per_chunk(served_cpu, args),
                    }
                )
                print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
        finally:
            broker.stop()
    return {
        "devices": args.devices,
        "device_processes": len(shares),
        "source": args.source,
        "store_cache_MiB": args.cache_mib if args.source == "store" else None,
        "chunks_per_device": args.chunks,
        "chunk_bytes": args.size,
        "total_bytes_per_phase": total,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "min_ratio": min(r["ratio"] for r in rounds),
        "all_complete": all(r["served_complete"] for r in rounds),
        "rounds": rounds,
    }


def _per_chunk(cpu: dict[str, float], args) -> dict[str, float]:
    n = args.devices * args.chunks
    out = {k: round(v / n * 1e6, 1) for k, v in cpu.items()}
    out["total"] = round(sum(cpu.values()) / n * 1e6, 1)
    return out


# ------------------------------------------------------------------------------- flood


async def _flooder(port: int, seconds: float) -> dict:
    from agent.transport.aioclient import AsyncMqttClient
    from firmware_bundles import protocol as wire

    c = AsyncMqttClient(_settings(port, "dev-flood"))
    await c.start()
    await c.wait_connected(10)
    ev = wire.encode_document(wire.Channel.EVENTS, {"type": "spam", "pad": "x" * 200})
    req = wire.encode_fetch(wire.FetchRequest(wire.FetchOp.CHUNKS, "r", "b1", tuple(range(64))))
    t_ev, t_fe = (
        wire.device_topic("dev-flood", wire.Channel.EVENTS),
        wire.device_topic("dev-flood", wire.Channel.FETCH),
    )
    print("READY", flush=True)
    n, end = 0, time.monotonic() + seconds
    sem = asyncio.Semaphore(200)
    while time.monotonic() < end:
        for topic, payload in ((t_ev, ev), (t_fe, req)):
            await sem.acquire()
            c.publish(topic, payload).add_done_callback(lambda _f: sem.release())
            n += 1
        if n % 100 == 0:
            await asyncio.sleep(0)
    await c.stop()
    return {"sent": n, "rate": n / seconds}


async def _latency_phase(gw, devices, seconds: float, interval: float) -> list[float]:
    lat: list[float] = []

    async def listen(t) -> None:
        async for cmd in t.commands():
            sent = json.loads(cmd)["signed"]["t"]
            lat.append(time.time() - sent)

    tasks = [asyncio.create_task(listen(t)) for t in devices]
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t = devices[i % len(devices)]
        body = json.dumps({"signed": {"t": time.time(), "n": i}, "signatures": []}).encode()
        gw.publish_command(t.device_id, body)
        i += 1
        await asyncio.sleep(interval)
    await asyncio.sleep(1.0)
    for task in tasks:
        task.cancel()
    return lat


def _summary(lat: list[float]) -> dict:
    lat = sorted(lat)
    q = statistics.quantiles(lat, n=100)
    return {
        "n": len(lat),
        "p50_ms": q[49] * 1000,
        "p95_ms": q[94] * 1000,
        "p99_ms": q[98] * 1000,
        "max_ms": lat[-1] * 1000,
    }


def flood(args) -> dict:
    from agent.adapters.mqtt import MqttTransport
    from controller.gateway import MqttGateway

    with tempfile.TemporaryDirectory() as tmp:
        broker = _broker(Path(tmp))
        try:

            async def run() -> dict:
                inbox = NullInbox()
                gw = MqttGateway(
                    _settings(broker.port, "controller"),
                    inbox,
                    MemoryChunks("b1", 64, 16 * 1024),
                    read_retained=False,
                )
                await gw.start()
                await gw.wait_ready()
                devices = [
                    MqttTransport(f"dev-{i}", _settings(broker.port, f"dev-{i}"))
                    for i in range(args.healthy)
                ]
                for d in devices:
                    await d.start()
                assert all(await asyncio.gather(*(d.reachable(10) for d in devices)))
                quiet = await _latency_phase(gw, devices, args.seconds, 0.02)
                fl = _child("flooder", str(broker.port), str(args.seconds + 2))
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, _wait_ready, fl)
                await asyncio.sleep(1.0)
                loud = await _latency_phase(gw, devices, args.seconds, 0.02)
                out = await loop.run_in_executor(None, fl.communicate)
                flooder = json.loads(out[0].strip().splitlines()[-1])
                for d in devices:
                    await d.stop()
                await gw.stop()
                return {
                    "healthy_devices": args.healthy,
                    "seconds_per_phase": args.seconds,
                    "without_flood": _summary(quiet),
                    "with_flood": _summary(loud),
                    "flood_messages_sent": flooder["sent"],
                    "gateway_drops": dict(gw.stats.drops.counts),
                    "chunk_server_drops": dict(gw.serving_stats.drops.counts),
                    "flood_events_reaching_inbox": inbox.events,
                    "flood_chunks_served": gw.serving_stats.served,
                }

            return asyncio.run(run())
        finally:
            broker.stop()


# ------------------------------------------------------------------------------- resume


def resume(args) -> dict:
    from agent.adapters.mqtt import MqttTransport
    from controller.gateway import MqttGateway
    from firmware_bundles.throttle import LinkProfile

    n, size = 200, 64 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        broker = _broker(Path(tmp))
        try:

            async def run() -> dict:
                chunks = MemoryChunks("b1", n, size)
                gw = MqttGateway(
                    _settings(broker.port, "controller"), NullInbox(), chunks, read_retained=False
                )
                await gw.start()
                await gw.wait_ready()
                d = MqttTransport(
                    "dev-1",
                    _settings(broker.port, "dev-1"),
                    window=8,
                    request_timeout=5.0,
                    profile=LinkProfile.flat(4e6, burst=size),
                )
                await d.start()
                assert await d.reachable(10)
                got: dict[int, bytes] = {}
                cut_at = {n * (k + 1) // (args.cuts + 1) for k in range(args.cuts)}
                t0 = time.monotonic()
                async for i, data in d.fetch_chunks("b1", list(range(n))):
                    got[i] = data
                    if len(got) in cut_at:
                        d.client.drop_link()
                elapsed = time.monotonic() - t0
                ok = all(got[i] == chunks.data[i] for i in range(n))
                await d.stop()
                await gw.stop()
                resent = gw.serving_stats.served_bytes - n * size
                return {
                    "chunks": n,
                    "chunk_bytes": size,
                    "cuts": args.cuts,
                    "reconnects": d.client.stats.connects - 1,
                    "complete": ok,
                    "server_resent_bytes": resent,
                    "device_duplicate_bytes": d.stats.duplicate_bytes,
                    "re_requests": d.stats.re_requests,
                    "max_resent_per_cut_in_chunks": max(resent, d.stats.duplicate_bytes)
                    / args.cuts
                    / size,
                    "seconds": elapsed,
                }

            return asyncio.run(run())
        finally:
            broker.stop()


def main() -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)
    ap = argparse.ArgumentParser()
    ap.add_argument("role")
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--size", type=int, default=64 * 1024)
    ap.add_argument("--healthy", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--cuts", type=int, default=5)
    ap.add_argument("--device-procs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    # memory: chunks handed over from RAM; store: read and re-hashed from a ChunkStore per
    # request, as the controller's ReleaseStore does.
    ap.add_argument("--source", choices=("memory", "store"), default="memory")
    # store only: the verified-chunk LRU (the controller's chunk_cache_bytes default is 64 MiB);
    # 0 reads and re-hashes the file on every request.
    ap.add_argument("--cache-mib", type=int, default=64)
    args = ap.parse_args()
    r = args.rest
    if args.role == "raw-sub":
        print(json.dumps(asyncio.run(_raw_subscribers(*map(int, r[:4])))))
    elif args.role == "served-dev":
        print(json.dumps(asyncio.run(_served_devices(*map(int, r[:4])))))
    elif args.role == "flooder":
        print(json.dumps(asyncio.run(_flooder(int(r[0]), float(r[1])))))
    else:
        result = {"serving": serving, "flood": flood, "resume": resume}[args.role](args)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
