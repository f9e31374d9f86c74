"""The fleet CA: device client certificates for the broker's TLS listener, and their CRL.

The CA key and certificate live in ``<data-dir>/ca/`` (created on first start, key file mode
0600). A device certificate's CN is the device id (Mosquitto ``use_identity_as_username`` makes
it the ACL ``%u``), so the id is checked before signing. ``crl.pem`` is rewritten atomically on
every revocation; the broker reads it (``crlfile``).

    ca = FleetCA.load_or_create(data_dir / "ca")
    cert_pem, serial = ca.sign_csr(csr_pem, "gw-0042", days=825)
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.errors import InvalidInput
from controller.ids import check_enrollable_device_id

_MAX_CSR = 16 * 1024


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


@dataclass
class FleetCA:
    """An EC P-256 CA that signs device CSRs and publishes a CRL."""

    directory: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load_or_create(cls, directory: Path, now: dt.datetime | None = None) -> FleetCA:
        """Load the CA from ``directory``, creating it on first use."""
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise TypeError("fleet CA key is not an EC key")
            return cls(directory, key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slotline fleet CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _atomic_write(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(directory, key, cert)
        ca.write_crl([])
        return ca

    @property
    def cert_pem(self) -> str:
        """The CA certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign_csr(
        self, csr_pem: str, device_id: str, *, days: int = 825, now: dt.datetime | None = None
    ) -> tuple[str, str]:
        """Issue a client certificate with CN = ``device_id`` for the CSR's key.

        The CSR's own subject is ignored: the controller decides the name.

        Returns:
            (certificate PEM, serial as hex).

        Raises:
            InvalidInput: a CSR that does not parse, is not self-signed correctly or uses an
                unsupported key type; an unsafe or reserved device id (a device certificate
                must never carry a relay, bridge or controller identity).
        """
        check_enrollable_device_id(device_id)
        if len(csr_pem) > _MAX_CSR:
            raise InvalidInput("CSR too large")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, InvalidSignature, TypeError) as e:
            raise InvalidInput(f"CSR does not parse: {e}") from e
        if not valid:
            raise InvalidInput("CSR signature does not verify")
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
            raise InvalidInput("CSR key must be EC or Ed25519")
        now = now or dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode(), format(serial, "x")

    def issue(
        self,
        common_name: str,
        *,
        server_names: Iterable[str] = (),
        days: int = 825,
        now: dt.datetime | None = None,
    ) -> tuple[str, str]:
        """A new key and certificate signed by the fleet CA, for the broker or the controller.

        With ``server_names`` it is a TLS server certificate (DNS names / IP addresses in the
        subjectAltName); without, a client certificate (CN is the broker username, e.g. the
        ``controller`` of the ACL).

        Returns:
            (certificate PEM, private key PEM).
        """
        import ipaddress  # noqa: PLC0415

        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        names = list(server_names)
        if names:
            alt: list[x509.GeneralName] = []
            for n in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()

    def write_crl(
        self, revoked: Iterable[tuple[str, dt.datetime]], now: dt.datetime | None = None
    ) -> Path:
        """Rewrite ``crl.pem`` with every (serial hex, revoked at) given."""
        now = now or dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=30))
        )
        for serial_hex, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial_hex, 16))
                .revocation_date(at)
                .build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        path = self.directory / "crl.pem"
        _atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))
        return path
