"""The world a run needs: an MQTT broker and a controller, started or reached within seconds.

Rules:
- The broker is the one given (``mqtt://host:port``, checked with a TCP connect within the connect
  timeout) or one the run starts with the transport's launcher (Mosquitto on PATH preferred,
  else iotcore). Only a broker the run started can be restarted by a ``broker_restart`` fault.
- The controller is the real ``ControllerService`` with the real MQTT gateway and scheduler,
  in this process on its own thread and event loop (devices run on other loops or processes).
  ``restart()`` tears it down and builds it again on the same database and data directory:
  what survives is exactly what the controller persisted.
- Nothing here sleeps without a deadline; ``Unreachable`` says what did not answer and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from simulator.errors import Unreachable

log = logging.getLogger("slotline.sim")


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` -> (host, port)."""
    p = urlparse(url)
    if p.scheme not in ("mqtt", "tcp") or not p.hostname:
        raise ValueError(f"broker URL {url!r} is not mqtt://HOST:PORT")
    return p.hostname, p.port or 1883


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_tcp(host: str, port: int, timeout: float, what: str) -> None:
    """Connect to ``host:port`` within ``timeout`` seconds or raise ``Unreachable``."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout)):
                return
        except OSError as e:
            last = e.strerror or str(e)
        if time.monotonic() >= deadline:
            raise Unreachable(f"{what} at {host}:{port} did not answer within {timeout:g} s "
                              f"({last})")
        time.sleep(0.1)


class Broker:
    """A broker for the run: given, or started (and then restartable)."""

    def __init__(self, url: str | None, workdir: Path, connect_timeout: float) -> None:
        self._workdir = workdir
        self._timeout = connect_timeout
        self._embedded: Any = None
        self.kind = "external"
        if url is None:
            self._start(None)
        else:
            self.host, self.port = parse_broker_url(url)
            wait_tcp(self.host, self.port, connect_timeout, "the MQTT broker")

    def _start(self, port: int | None) -> None:
        from agent.transport.broker import EmbeddedBroker  # noqa: PLC0415 - optional dependency

        try:
            self._embedded = EmbeddedBroker.start_default(self._workdir / "broker", port=port)
        except (RuntimeError, OSError) as e:
            raise Unreachable(f"could not start an MQTT broker: {e}") from e
        self.kind = self._embedded.kind
        self.host, self.port = self._embedded.host, self._embedded.port

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def restartable(self) -> bool:
        """Whether this run owns the broker process."""
        return self._embedded is not None

    def stop(self) -> None:
        """Stop the broker if the run started it."""
        if self._embedded is not None:
            self._embedded.stop()

    def restart(self, down_for: float) -> None:
        """Stop the broker, wait ``down_for`` seconds, start it again on the same port."""
        if self._embedded is None:
            raise RuntimeError("cannot restart a broker this run did not start")
        self._embedded.stop()
        time.sleep(down_for)
        self._start(self.port)


@dataclass
class ControllerHandle:
    """The controller service and its gateway, as seen by the driver."""

    service: Any
    gateway: Any
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread


class Controller:
    """The real controller, in-process on its own thread (see module docstring)."""

    def __init__(self, database_url: str, data_dir: Path, broker_url: str, *,
                 connect_timeout: float, tick: float = 0.25, run_tag: str = "") -> None:
        self.database_url = database_url
        # Per run: a broker others use may hold other controllers' sessions in the default
        # shared-subscription group, and they would take a share of our devices' reports.
        self.run_tag = run_tag or uuid.uuid4().hex[:8]
        self.data_dir = data_dir
        self.broker_url = broker_url
        self.connect_timeout = connect_timeout
        self.tick_interval = tick
        self.restarts = 0
        self._stop = threading.Event()
        self._handle: ControllerHandle | None = None
        self.tick_errors = 0
        self._start()

    @property
    def service(self) -> Any:
        """The running ``ControllerService``."""
        assert self._handle is not None
        return self._handle.service

    @property
    def gateway(self) -> Any:
        """The running ``MqttGateway``."""
        assert self._handle is not None
        return self._handle.gateway

    def _start(self) -> None:
        from agent.transport.aioclient import MqttSettings  # noqa: PLC0415
        from controller.gateway import MqttGateway  # noqa: PLC0415
        from controller.service import ControllerConfig, ControllerService  # noqa: PLC0415

        try:
            service = ControllerService(ControllerConfig(
                database_url=self.database_url, data_dir=self.data_dir,
                broker_url=self.broker_url))
        except Exception as e:
            raise Unreachable(f"the controller database {_redact(self.database_url)} "
                              f"could not be opened: {e}") from e
        if not service.has_admin():
            # As the real service does on first start: an admin token for the operator.
            token = service.bootstrap_admin_token()
            path = self.data_dir / "admin.token"
            path.write_text(token + "\n", encoding="utf-8")
            path.chmod(0o600)
        loop = asyncio.new_event_loop()
        ready: dict[str, Any] = {}
        started = threading.Event()
        self._stop = threading.Event()
        # One client id across restarts: the broker keeps the gateway's persistent session (and
        # what devices sent meanwhile) for the controller that comes back.
        settings = MqttSettings.from_url(self.broker_url, f"sim-controller-{self.run_tag}",
                                         session_expiry=600)
        gateway = MqttGateway(settings, inbox=service, chunks=service,
                              share_group=f"sim{self.run_tag}")
        service.gateway = gateway

        async def main() -> None:
            await gateway.start()
            ready["ok"] = await gateway.wait_ready(self.connect_timeout)
            started.set()
            if not ready["ok"]:
                return
            # The scheduler runs on its own thread, as in ``controller.runner``: its database work
            # must never stall the gateway's loop (PUBACKs, chunk serving).
            ticker = threading.Thread(target=self._scheduler, args=(service,),
                                      name="sim-scheduler", daemon=True)
            ticker.start()
            # The stop flag is a threading.Event (set from the driver thread): wait for it off-loop.
            await asyncio.to_thread(self._stop.wait)
            await asyncio.to_thread(ticker.join, 10)
            await gateway.stop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(main())
            except Exception as e:
                ready["error"] = e
                started.set()
            finally:
                with contextlib.suppress(Exception):
                    loop.close()

        thread = threading.Thread(target=run, name="sim-controller", daemon=True)
        thread.start()
        if not started.wait(self.connect_timeout + 2) or not ready.get("ok"):
            self._stop.set()
            thread.join(5)
            service.close()
            why = ready.get("error") or "no CONNACK"
            raise Unreachable(f"the controller's gateway could not connect to {self.broker_url} "
                              f"within {self.connect_timeout:g} s ({why})")
        self._handle = ControllerHandle(service, gateway, loop, thread)

    def _scheduler(self, service: Any) -> None:
        service.publish_pending()  # decided before a restart, not yet handed over
        while not self._stop.wait(self.tick_interval):
            try:
                service.tick()
            except Exception:
                self.tick_errors += 1
                log.exception("controller tick failed")

    def serve_api(self, port: int, host: str = "127.0.0.1") -> str:
        """Serve the controller's HTTP API (OpenAPI at /docs) on a thread; returns its URL."""
        import uvicorn  # noqa: PLC0415

        from controller.api.app import create_app  # noqa: PLC0415

        config = uvicorn.Config(create_app(self.service), host=host, port=port,
                                log_level="error", lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="sim-api", daemon=True)
        thread.start()
        self._api: tuple[Any, threading.Thread] | None = (server, thread)
        wait_tcp(host, port, self.connect_timeout, "the controller API")
        return f"http://{host}:{port}"

    def stop_api(self) -> None:
        """Stop the HTTP API if it runs."""
        api = getattr(self, "_api", None)
        if api is not None:
            api[0].should_exit = True
            api[1].join(5)
            self._api = None

    def stop(self) -> None:
        """Stop the API, the scheduler and the gateway, close the database."""
        self.stop_api()
        if self._handle is None:
            return
        self._stop.set()
        self._handle.thread.join(10)
        self._handle.service.close()
        self._handle = None

    def restart(self, down_for: float) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same state."""
        self.stop()
        time.sleep(down_for)
        self.restarts += 1
        self._start()

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(service)`` from the driver thread (the service is thread-safe per call)."""
        return fn(self.service)


def _redact(url: str) -> str:
    p = urlparse(url)
    if p.password:
        return url.replace(p.password, "***")
    return url
