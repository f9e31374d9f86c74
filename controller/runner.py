"""Wiring of the running controller.

Service, MQTT gateway (if a broker is given), scheduler thread, uvicorn: the only place that
starts threads or servers.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import uvicorn

from controller.api.app import create_app
from controller.service import ControllerConfig, ControllerService

log = logging.getLogger("slotline.controller")


def _gateway(broker_url: str, service: ControllerService) -> Any:
    """The transport engineer's MQTT gateway, started against ``broker_url``."""
    from controller.gateway import start_gateway  # noqa: PLC0415

    return start_gateway(broker_url, inbox=service, chunks=service)


def _write_admin_token(service: ControllerService, data_dir: Path) -> None:
    if service.has_admin():
        return
    token = service.bootstrap_admin_token()
    path = data_dir / "admin.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.warning("bootstrap admin token written to %s", path)


def run(
    *,
    host: str,
    port: int,
    database_url: str,
    data_dir: Path,
    broker_url: str | None,
    tick: float,
    max_upload: int,
) -> int:
    """Run until interrupted; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ControllerConfig(
        database_url=database_url,
        data_dir=data_dir,
        broker_url=broker_url or "mqtt://127.0.0.1:1883",
        max_upload_bytes=max_upload,
    )
    service = ControllerService(config)
    _write_admin_token(service, data_dir)
    gateway = _gateway(broker_url, service) if broker_url else None
    service.gateway = gateway
    stop = threading.Event()

    def scheduler() -> None:
        service.publish_pending()  # commands decided before a crash, not yet handed over
        while not stop.wait(tick):
            try:
                service.tick()
            except Exception:
                log.exception("scheduler round failed; retrying next round")

    thread = threading.Thread(target=scheduler, name="scheduler", daemon=True)
    thread.start()
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
        thread.join(timeout=10)
        if gateway is not None and hasattr(gateway, "close"):
            gateway.close()
        service.close()
    return 0
