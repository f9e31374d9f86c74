"""The fleet CA end to end with a real Mosquitto TLS listener: an enrolled device's certificate
gets in; after decommissioning, the CRL the controller writes keeps it out; a site relay's
certificate from ``controller certs --relay`` gets in."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from agent.enroll_cli import make_csr
from agent.transport.broker import EmbeddedBroker, MosquittoConfig, TlsListener, free_port
from controller.auth import Role
from controller.service import ControllerConfig, ControllerService, Principal

OPS = Principal("ops", Role.OPERATOR)


def _connect(port, ca, cert, key, client_id):
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    client.tls_set_context(ctx)
    result = []
    client.on_connect = lambda c, u, f, rc, p: result.append("ok" if not rc.is_failure else str(rc))
    try:
        client.connect("127.0.0.1", port, keepalive=5)
        for _ in range(60):
            client.loop(0.05)
            if result:
                break
    except (OSError, ssl.SSLError) as e:
        return f"refused: {type(e).__name__}"
    finally:
        client.disconnect()
    return result[0] if result else "refused: no CONNACK"


def _start(tmp_path, port, tls):
    return EmbeddedBroker.start_mosquitto(
        MosquittoConfig(port=port, run_as_root=True, tls=tls), tmp_path / "broker"
    )


def test_enrolled_device_connects_and_decommissioned_one_is_refused(tmp_path):
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        if os.environ.get("SLOTLINE_REQUIRE_SERVICES") == "1":
            pytest.fail("mosquitto is not installed")
        pytest.skip("mosquitto is not installed")
    data = tmp_path / "ctl"
    svc = ControllerService(
        ControllerConfig(database_url=f"sqlite:///{tmp_path / 'c.db'}", data_dir=data)
    )
    try:
        ident = tmp_path / "dev"
        ident.mkdir()
        for device_id in ("gw-keep", "gw-gone"):
            key_pem, csr = make_csr(device_id)
            tok = svc.issue_enrollment_token(OPS, "berlin", "m1")["token"]
            got = svc.enroll(tok, device_id, "SN", "m1", csr.decode())
            (ident / f"{device_id}.key").write_bytes(key_pem)
            (ident / f"{device_id}.pem").write_text(got.certificate_pem)
        certs = tmp_path / "certs"
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import slotline_cli; slotline_cli.main()",
                "controller",
                "certs",
                "--data-dir",
                str(data),
                "--broker-host",
                "127.0.0.1",
                "--out",
                str(certs),
                "--relay",
                "berlin",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert (certs / "broker.key").stat().st_mode & 0o777 == 0o600
        # The site relay's identity comes from here, never from enrollment (which refuses it).
        relay_cert = x509.load_pem_x509_certificate((certs / "relay-berlin.pem").read_bytes())
        cn = relay_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == "relay-berlin"
        assert (certs / "relay-berlin.key").stat().st_mode & 0o777 == 0o600
        tls = TlsListener(
            cafile=str(certs / "ca.pem"),
            certfile=str(certs / "broker.pem"),
            keyfile=str(certs / "broker.key"),
            crlfile=str(data / "ca" / "crl.pem"),
        )
        port = free_port()
        broker = _start(tmp_path, port, tls)
        ca = certs / "ca.pem"
        try:
            assert (
                _connect(port, ca, ident / "gw-gone.pem", ident / "gw-gone.key", "gw-gone") == "ok"
            )
            assert (
                _connect(port, ca, certs / "controller.pem", certs / "controller.key", "controller")
                == "ok"
            )
            relay = ("relay-berlin.pem", "relay-berlin.key")
            assert _connect(port, ca, *(certs / f for f in relay), "relay-berlin") == "ok"
        finally:
            broker.stop()
        svc.decommission(OPS, "gw-gone")
        broker = _start(tmp_path, port, tls)  # Mosquitto reads the CRL when it starts
        try:
            assert (
                _connect(port, ca, ident / "gw-gone.pem", ident / "gw-gone.key", "gw-gone") != "ok"
            )
            assert (
                _connect(port, ca, ident / "gw-keep.pem", ident / "gw-keep.key", "gw-keep") == "ok"
            )
        finally:
            broker.stop()
    finally:
        svc.close()
