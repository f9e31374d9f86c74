"""Wiring of the running controller.

Service, MQTT gateway (if a broker is given, on its own event loop thread), the report writer and
scheduler threads, uvicorn: the only place that starts threads or servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

import uvicorn

from controller.api.app import create_app
from controller.service import ControllerConfig, ControllerService

log = logging.getLogger("slotline.controller")


class GatewayThread:
    """The MQTT gateway running on an event loop in a daemon thread."""

    def __init__(
        self,
        broker_url: str,
        service: ControllerService,
        client_id: str,
        tls_dir: Path | None = None,
    ) -> None:
        from agent.transport.aioclient import MqttSettings, TlsFiles  # noqa: PLC0415
        from controller.gateway import MqttGateway  # noqa: PLC0415
        from firmware_bundles.throttle import LinkProfile, SiteBudgets  # noqa: PLC0415

        budgets = SiteBudgets(
            profiles={
                site["name"]: LinkProfile.flat(site["bandwidth_bps"] / 8, name=site["name"])
                for site in service.list_sites()
                if site["bandwidth_bps"]
            }
        )
        self.loop = asyncio.new_event_loop()
        tls = None
        if tls_dir is not None:
            tls = TlsFiles(
                tls_dir / "ca.pem", tls_dir / "controller.pem", tls_dir / "controller.key"
            )
        settings = MqttSettings.from_url(broker_url, client_id, tls=tls)
        self.gateway = MqttGateway(settings, service, service, budgets=budgets)
        self.thread = threading.Thread(target=self._run, name="mqtt-gateway", daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.gateway.start())
        self._ready.set()
        self.loop.run_forever()

    def start(self, timeout: float = 15.0) -> None:
        """Start the loop thread and wait until the gateway is connected."""
        self.thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("MQTT gateway did not start")
        fut = asyncio.run_coroutine_threadsafe(self.gateway.wait_ready(timeout), self.loop)
        if not fut.result(timeout + 1):
            log.warning("MQTT gateway not connected yet; it keeps retrying")

    def publish_command(self, device_id: str, command: bytes) -> None:
        """DeviceGateway: thread-safe hand-over to the gateway's loop."""
        self.gateway.publish_command(device_id, command)

    def close(self) -> None:
        """Stop the gateway and its loop."""
        fut = asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop)
        try:
            fut.result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def _write_admin_token(service: ControllerService, data_dir: Path) -> None:
    if service.has_admin():
        return
    token = service.bootstrap_admin_token()
    path = data_dir / "admin.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.warning("bootstrap admin token written to %s", path)


def _loop(stop: threading.Event, every: float, fn: Any, what: str) -> None:
    while not stop.wait(every):
        try:
            fn()
        except Exception:
            log.exception("%s failed; retrying", what)


def run(
    *,
    host: str,
    port: int,
    database_url: str,
    data_dir: Path,
    broker_url: str | None,
    tick: float,
    advertise_broker: str | None = None,
    broker_tls: Path | None = None,
    max_upload: int,
    trust_file: Path | None = None,
    command_key: Path | None = None,
    client_id: str = "slotline-controller",
) -> int:
    """Run until interrupted; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ControllerConfig(
        database_url=database_url,
        data_dir=data_dir,
        broker_url=advertise_broker or broker_url or "mqtt://127.0.0.1:1883",
        max_upload_bytes=max_upload,
    )
    service = ControllerService(config)
    if trust_file is not None and command_key is not None:
        from firmware_bundles.keys import read_key_file  # noqa: PLC0415

        key, _role = read_key_file(command_key)
        service.releases.provision(trust_file.read_bytes(), key)
    _write_admin_token(service, data_dir)
    gateway = None
    if broker_url:
        gateway = GatewayThread(broker_url, service, client_id, broker_tls)
        gateway.start()
        service.gateway = gateway
    # Commands decided before a crash but not handed over yet go out first.
    service.publish_pending()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_loop,
            args=(stop, tick, service.tick, "scheduler round"),
            name="scheduler",
            daemon=True,
        ),
        threading.Thread(
            target=_loop,
            args=(stop, 0.2, service.drain_reports, "report writer"),
            name="reports",
            daemon=True,
        ),
    ]
    for t in threads:
        t.start()
    print(f"slotline controller ready on http://{host}:{port}", flush=True)  # noqa: T201
    try:
        uvicorn.run(
            create_app(service),
            host=host,
            port=port,
            log_level="warning",
            limit_concurrency=200,
            timeout_keep_alive=5,
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if gateway is not None:
            gateway.close()
        service.close()
    return 0
