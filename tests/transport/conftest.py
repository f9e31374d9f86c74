"""Fixtures for transport tests: Mosquitto brokers started on free ports with generated configs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from transport_pki import ThrowawayPKI

from agent.transport.aioclient import MqttSettings, TlsFiles
from agent.transport.broker import EmbeddedBroker, MosquittoConfig, TlsListener, free_port

REQUIRE_SERVICES = os.environ.get("SLOTLINE_REQUIRE_SERVICES") == "1"


def _need_mosquitto() -> None:
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        return
    if REQUIRE_SERVICES:
        pytest.fail("mosquitto is not installed")
    pytest.skip("mosquitto is not installed")


@dataclass
class SecureBroker:
    broker: EmbeddedBroker
    pki: ThrowawayPKI

    def settings(self, cn: str, *, client_id: str | None = None, **kw: object) -> MqttSettings:
        """Settings for a client with a certificate for ``cn`` (issued on first use)."""
        cert, key = self.pki.dir / f"{cn}.pem", self.pki.dir / f"{cn}.key"
        if not cert.exists():
            cert, key = self.pki.issue(cn)
        return MqttSettings(
            host="127.0.0.1",
            port=self.broker.port,
            client_id=client_id or cn,
            tls=TlsFiles(self.pki.ca, cert, key),
            backoff_initial=0.1,
            backoff_max=0.5,
            connect_timeout=3.0,
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A plain loopback Mosquitto (no ACL) on a free port."""
    _need_mosquitto()
    broker = EmbeddedBroker.start_mosquitto(
        MosquittoConfig(port=free_port(), run_as_root=True), tmp_path / "plain"
    )
    yield broker
    broker.stop()


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    """Mosquitto with the production settings: TLS, client certs, CN as identity, ACL, CRL."""
    _need_mosquitto()
    pki = ThrowawayPKI(tmp_path / "pki")
    config = MosquittoConfig(
        port=free_port(),
        tls=TlsListener(
            cafile=str(pki.ca),
            certfile=str(pki.server_cert),
            keyfile=str(pki.server_key),
            crlfile=str(pki.crl),
        ),
        acl_file=str(tmp_path / "acl"),
        controllers=("controller",),
        run_as_root=True,
    )
    secure = SecureBroker(EmbeddedBroker.start_mosquitto(config, tmp_path / "secure"), pki)
    yield secure
    secure.broker.stop()  # a test may have restarted it (new process)
