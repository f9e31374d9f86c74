"""Site relay behind a shaped WAN link: 50 devices, each chunk over the WAN once.

    sudo .venv/bin/python -m bench.transport_relay [--devices 50 --chunks 32 --size 32768]

Central broker and gateway in the root namespace; the site (its own Mosquitto, the relay and the
devices) in a namespace behind a veth shaped to 2 Mbit/s with htb. WAN bytes are counted two
ways: chunk payload the relay fetched, and bytes received on the site's WAN interface (IP, TCP
and MQTT headers, control traffic included). Target: WAN <= 1.05 x bundle size.
"""

# ruff: noqa: PLC0415 - children import lazily; callback signatures are fixed
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.transport_common import MemoryChunks, NullInbox, shaped_netns, wait_port

NS, HOST_IP, NS_IP = "sltrel", "10.202.0.1", "10.202.0.2"


def _settings(host: str, port: int, cid: str):
    from agent.transport.aioclient import MqttSettings

    return MqttSettings(host, port, cid, backoff_initial=0.1, backoff_max=1.0)


def _rx(dev: str) -> int:
    return int(Path(f"/sys/class/net/{dev}/statistics/rx_bytes").read_text())


async def _site(port: int, devices: int, chunks: int, tmp: Path) -> dict:
    from agent.adapters.mqtt import MqttTransport
    from agent.transport.broker import EmbeddedBroker, MosquittoConfig, free_port
    from agent.transport.relay import SiteRelay

    site = EmbeddedBroker.start_mosquitto(MosquittoConfig(port=free_port(), run_as_root=True), tmp)
    try:
        relay = SiteRelay(
            "s1",
            local=_settings("127.0.0.1", site.port, "relay-s1"),
            upstream=_settings(HOST_IP, port, "relay-s1"),
            cache_dir=tmp / "cache",
        )
        await relay.start()
        assert await relay.upstream.client.wait_connected(20)
        ds = [
            MqttTransport(f"dev-{i}", _settings("127.0.0.1", site.port, f"dev-{i}"))
            for i in range(devices)
        ]
        for d in ds:
            await d.start()
        assert all(await asyncio.gather(*(d.reachable(20) for d in ds)))
        await asyncio.sleep(1.0)
        rx0 = _rx(f"{NS}-n")
        t0 = time.monotonic()

        async def fetch(d: MqttTransport) -> int:
            return sum([len(b) async for _, b in d.fetch_chunks("b1", list(range(chunks)))])

        per_device = await asyncio.gather(*(fetch(d) for d in ds))
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.5)
        rx = _rx(f"{NS}-n") - rx0
        for d in ds:
            await d.stop()
        await relay.stop()
        return {
            "per_device_bytes": per_device,
            "seconds": elapsed,
            "wan_iface_rx_bytes": rx,
            "relay": relay.stats.__dict__,
        }
    finally:
        site.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", nargs="?", default="bench")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--size", type=int, default=32 * 1024)
    ap.add_argument("--rate-kbit", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=300)
    args = ap.parse_args()
    if args.role == "site":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(asyncio.run(_site(args.port, args.devices, args.chunks, Path(tmp)))))
        return
    if args.role == "gateway":
        chunks = MemoryChunks("b1", args.chunks, args.size)

        async def gw() -> None:
            from controller.gateway import MqttGateway

            g = MqttGateway(
                _settings(HOST_IP, args.port, "controller"),
                NullInbox(),
                chunks,
                read_retained=False,
            )
            await g.start()
            await asyncio.sleep(args.seconds)

        asyncio.run(gw())
        return

    from agent.transport.broker import EmbeddedBroker, MosquittoConfig, free_port

    bundle = args.chunks * args.size
    with (
        shaped_netns(NS, HOST_IP, NS_IP, rate_kbit=args.rate_kbit),
        tempfile.TemporaryDirectory() as tmp,
    ):
        port = free_port()
        central = EmbeddedBroker.start_mosquitto(
            MosquittoConfig(port=port, bind=HOST_IP, run_as_root=True), Path(tmp)
        )
        gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.transport_relay",
                "gateway",
                "--port",
                str(port),
                "--chunks",
                str(args.chunks),
                "--size",
                str(args.size),
            ]
        )
        try:
            wait_port(HOST_IP, port)
            time.sleep(1.0)
            out = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    NS,
                    sys.executable,
                    "-m",
                    "bench.transport_relay",
                    "site",
                    "--port",
                    str(port),
                    "--devices",
                    str(args.devices),
                    "--chunks",
                    str(args.chunks),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            ).stdout
        finally:
            gw.terminate()
            gw.wait(10)
            central.stop()
    site = json.loads(out.strip().splitlines()[-1])
    result = {
        "devices": args.devices,
        "link_kbit": args.rate_kbit,
        "bundle_bytes": bundle,
        "all_devices_complete": all(b == bundle for b in site["per_device_bytes"]),
        "seconds": site["seconds"],
        "wan_chunk_payload_bytes": site["relay"]["wan_bytes"],
        "wan_payload_vs_bundle": site["relay"]["wan_bytes"] / bundle,
        "wan_iface_rx_bytes": site["wan_iface_rx_bytes"],
        "wan_iface_vs_bundle": site["wan_iface_rx_bytes"] / bundle,
        "relay": site["relay"],
        "without_relay_would_be_bytes": bundle * args.devices,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
