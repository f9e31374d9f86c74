"""Throttle accuracy over a shaped link (2 Mbit/s htb, 1 % loss), with a competing TCP flow.

    sudo .venv/bin/python -m bench.transport_throttle [--seconds 30]

Phases: the competing flow alone (link capacity C), then the agent (capped at 1 Mbit/s) and the
flow together. Targets: agent average within +-5 % of its cap; the flow keeps >= 90 % of C - cap.
"""

# ruff: noqa: PLC0415 - children import lazily; callback signatures are fixed
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.transport_common import MemoryChunks, NullInbox, shaped_netns, wait_port

NS, HOST_IP, NS_IP = "sltthr", "10.201.0.1", "10.201.0.2"
FLOW_PORT = 9100


def _settings(host: str, port: int, cid: str):
    from agent.transport.aioclient import MqttSettings

    return MqttSettings(host, port, cid, backoff_initial=0.1, backoff_max=1.0, keepalive=20)


async def _gateway(host: str, port: int, n: int, size: int, seconds: float) -> None:
    from controller.gateway import MqttGateway

    gw = MqttGateway(_settings(host, port, "controller"), NullInbox(), MemoryChunks("b1", n, size))
    await gw.start()
    await asyncio.sleep(seconds)
    await gw.stop()


async def _device(host: str, port: int, rate: float, n: int, seconds: float, window: int) -> dict:
    from agent.adapters.mqtt import MqttTransport
    from firmware_bundles.throttle import LinkProfile

    t = MqttTransport(
        "dev-1",
        _settings(host, port, "dev-1"),
        window=window,
        profile=LinkProfile.flat(rate, burst=16 * 1024),
        request_timeout=30,
    )
    await t.start()
    assert await t.reachable(20)
    arrivals: list[tuple[float, int]] = []
    start = time.monotonic()
    async for _, data in t.fetch_chunks("b1", list(range(n))):
        arrivals.append((time.monotonic(), len(data)))
        if time.monotonic() - start > seconds:
            break
    await t.stop()
    # Average over the run after the first chunk (the burst) up to the last arrival.
    span = arrivals[-1][0] - arrivals[0][0]
    payload = sum(b for _, b in arrivals[1:])
    return {
        "rate": payload / span,
        "chunks": len(arrivals),
        "seconds": span,
        "re_requests": t.stats.re_requests,
    }


def _receiver(seconds: float) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", FLOW_PORT))
    srv.listen(1)
    conn, _ = srv.accept()
    total, t0 = 0, time.monotonic()
    conn.settimeout(1.0)
    while time.monotonic() - t0 < seconds:
        try:
            data = conn.recv(65536)
        except TimeoutError:
            continue
        if not data:
            break
        total += len(data)
    print(json.dumps({"bytes": total, "seconds": time.monotonic() - t0}))


def _sender(stop: threading.Event) -> None:
    for _ in range(50):
        try:
            s = socket.create_connection((NS_IP, FLOW_PORT), 2)
            break
        except OSError:
            time.sleep(0.1)
    buf = b"\0" * 65536
    s.settimeout(1.0)
    while not stop.is_set():
        try:
            s.send(buf)
        except TimeoutError:
            continue
        except OSError:
            break
    s.close()


def _spawn_device(port: int, args: argparse.Namespace) -> subprocess.Popen[str]:
    """The throttled agent, inside the namespace, for the whole measured interval."""
    argv = ["ip", "netns", "exec", NS, sys.executable, "-m", "bench.transport_throttle",
            "device", "--port", str(port), "--seconds", str(args.seconds + 4),
            "--window", str(args.window), "--cap-kbit", str(args.cap_kbit)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def _flow(seconds: float) -> float:
    """Run the competing flow for ``seconds``; returns its goodput in bytes/s."""
    rx = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            NS,
            sys.executable,
            "-m",
            "bench.transport_throttle",
            "receiver",
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    stop = threading.Event()
    th = threading.Thread(target=_sender, args=(stop,))
    th.start()
    out, _ = rx.communicate(timeout=seconds + 30)
    stop.set()
    th.join()
    res = json.loads(out)
    return res["bytes"] / res["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", nargs="?", default="bench")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate-kbit", type=int, default=2000)
    ap.add_argument("--cap-kbit", type=int, default=1000)
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--queue", type=int, default=30, help="leaf FIFO length in packets")
    args = ap.parse_args()
    n, size = 2000, 16 * 1024
    cap = args.cap_kbit * 1000 / 8
    if args.role == "receiver":
        _receiver(args.seconds)
        return
    if args.role == "gateway":
        asyncio.run(_gateway(HOST_IP, args.port, n, size, args.seconds))
        return
    if args.role == "device":
        print(
            json.dumps(asyncio.run(_device(HOST_IP, args.port, cap, n, args.seconds, args.window)))
        )
        return

    from agent.transport.broker import EmbeddedBroker, MosquittoConfig, free_port

    result: dict = {
        "link_kbit": args.rate_kbit,
        "cap_kbit": args.cap_kbit,
        "loss": args.loss,
        "queue_packets": args.queue,
        "window": args.window,
    }
    with (
        shaped_netns(
            NS,
            HOST_IP,
            NS_IP,
            rate_kbit=args.rate_kbit,
            loss=args.loss,
            queue=args.queue,
        ),
        tempfile.TemporaryDirectory() as tmp,
    ):
        port = free_port()
        broker = EmbeddedBroker.start_mosquitto(
            MosquittoConfig(port=port, bind=HOST_IP, run_as_root=True), Path(tmp)
        )
        procs: list[subprocess.Popen] = []
        try:
            wait_port(HOST_IP, port)
            capacity = _flow(args.seconds / 2)
            result["flow_alone_kbit"] = capacity * 8 / 1000
            total = args.seconds * 3 + 60
            gw = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.transport_throttle",
                    "gateway",
                    "--port",
                    str(port),
                    "--seconds",
                    str(total),
                ]
            )
            procs.append(gw)
            time.sleep(1.0)
            dev = _spawn_device(port, args)
            procs.append(dev)
            out, _ = dev.communicate(timeout=args.seconds + 60)
            alone = json.loads(out.strip().splitlines()[-1])
            dev = _spawn_device(port, args)
            procs.append(dev)
            time.sleep(3.0)  # the device is connected and running at its cap
            flow_rate = _flow(args.seconds)
            out, _ = dev.communicate(timeout=args.seconds + 60)
            agent = json.loads(out.strip().splitlines()[-1])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(10)
            broker.stop()
    remaining = capacity - cap
    result.update(
        {
            "agent_alone_kbit": alone["rate"] * 8 / 1000,
            "agent_alone_vs_cap": alone["rate"] / cap,
            "agent_kbit": agent["rate"] * 8 / 1000,
            "agent_vs_cap": agent["rate"] / cap,
            "agent_chunks": agent["chunks"],
            "agent_re_requests": agent["re_requests"],
            "flow_with_agent_kbit": flow_rate * 8 / 1000,
            "flow_share_of_remaining": flow_rate / remaining,
            "pass_cap_5pct_alone": abs(alone["rate"] / cap - 1) <= 0.05,
            "pass_cap_5pct": abs(agent["rate"] / cap - 1) <= 0.05,
            "pass_flow_90pct": flow_rate / remaining >= 0.9,
        }
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
