"""``slotline enroll``: enroll this device with a controller using a single-use token.

It generates the device key (EC P-256, never leaves the device, file mode 0600), sends a CSR,
and writes what the controller answers into the identity directory:

    device.key  device.pem  ca.pem  trust.json  enrollment.json (device id, broker URL)

An existing identity is never overwritten (``--force`` replaces it). The controller decides the
certificate's name (CN = device id); the token decides the site and allowed hardware model.

    slotline enroll --controller https://ctl:8080 --token sle_... --hardware-model gw-x1
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import click


def _default_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/slotline/identity")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "slotline" / "identity"


def _default_serial() -> str:
    for candidate in ("/sys/class/dmi/id/product_serial", "/etc/machine-id"):
        try:
            text = Path(candidate).read_text().strip()
        except OSError:
            continue
        if text:
            return text[:128]
    return socket.gethostname()[:128]


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def make_csr(device_id: str) -> tuple[bytes, bytes]:
    """A new private key (PEM) and a CSR for it (PEM)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@click.command()
@click.option(
    "--controller",
    "controller_url",
    required=True,
    envvar="SLOTLINE_URL",
    help="Base URL of the controller API.",
)
@click.option(
    "--token",
    required=True,
    envvar="SLOTLINE_ENROLL_TOKEN",
    help="Single-use enrollment token from an operator or field engineer.",
)
@click.option("--device-id", default=None, help="Device id (default: the host name).")
@click.option("--hardware-model", required=True, help="Hardware model of this device.")
@click.option("--serial", default=None, help="Serial number (default: DMI serial / machine id).")
@click.option(
    "--dir",
    "identity_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Identity directory (default: /var/lib/slotline/identity as root).",
)
@click.option(
    "--cafile",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="CA bundle to verify the controller's HTTPS certificate.",
)
@click.option("--force", is_flag=True, help="Replace an existing identity.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def enroll(  # noqa: PLR0917 (click passes options positionally)
    controller_url: str,
    token: str,
    device_id: str | None,
    hardware_model: str,
    serial: str | None,
    identity_dir: Path | None,
    cafile: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Enroll this device with a controller."""
    import httpx  # noqa: PLC0415

    identity_dir = identity_dir or _default_dir()
    device_id = device_id or socket.gethostname().split(".")[0]
    if (identity_dir / "device.pem").exists() and not force:
        raise click.ClickException(f"{identity_dir} already holds an identity (use --force)")
    identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem, csr_pem = make_csr(device_id)
    body = {
        "token": token,
        "device_id": device_id,
        "serial": serial or _default_serial(),
        "hardware_model": hardware_model,
        "csr_pem": csr_pem.decode(),
    }
    try:
        r = httpx.post(
            f"{controller_url.rstrip('/')}/api/v1/enroll",
            json=body,
            timeout=30,
            verify=str(cafile) if cafile else True,
        )
    except httpx.HTTPError as e:
        raise click.ClickException(f"cannot reach the controller: {e}") from e
    try:
        answer = r.json()
    except ValueError:
        answer = {"code": "http.error", "message": r.text[:200]}
    if r.status_code != 200:
        click.echo(
            f"enrollment refused ({r.status_code} {answer.get('code')}): {answer.get('message')}",
            err=True,
        )
        sys.exit(1)
    _write(identity_dir / "device.key", key_pem, 0o600)
    _write(identity_dir / "device.pem", answer["certificate_pem"].encode(), 0o644)
    _write(identity_dir / "ca.pem", answer["ca_pem"].encode(), 0o644)
    if answer.get("trust_root") is not None:
        from firmware_bundles import canonical  # noqa: PLC0415

        _write(identity_dir / "trust.json", canonical.encode(answer["trust_root"]), 0o644)
    info = {
        "device_id": answer["device_id"],
        "broker_url": answer["broker_url"],
        "controller": controller_url,
        "hardware_model": hardware_model,
    }
    _write(identity_dir / "enrollment.json", json.dumps(info, indent=2).encode(), 0o644)
    if as_json:
        click.echo(json.dumps({**info, "identity_dir": str(identity_dir)}))
    else:
        click.echo(
            f"enrolled {info['device_id']}; identity in {identity_dir}; broker {info['broker_url']}"
        )
