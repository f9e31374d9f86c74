"""A throwaway PKI for broker tests: CA, broker certificate, client certificates, CRL."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class ThrowawayPKI:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.now = dt.datetime.now(dt.UTC)
        self.ca_key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(days=1))
            .not_valid_after(self.now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.revoked: list[int] = []
        self.serials: dict[str, int] = {}
        self.crl = directory / "crl.pem"
        self.write_crl()
        self.server_cert, self.server_key = self.issue("localhost", server=True)

    def issue(
        self, cn: str, *, server: bool = False, expired: bool = False, name: str | None = None
    ) -> tuple[Path, Path]:
        key = _key()
        serial = x509.random_serial_number()
        if expired:
            start, end = self.now - dt.timedelta(days=10), self.now - dt.timedelta(days=1)
        else:
            start, end = self.now - dt.timedelta(hours=1), self.now + dt.timedelta(days=10)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.ca_key, hashes.SHA256())
        stem = name or cn
        cert_path, key_path = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        self.serials[stem] = serial
        return cert_path, key_path

    def revoke(self, stem: str) -> None:
        self.revoked.append(self.serials[stem])
        self.write_crl()

    def write_crl(self) -> None:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(self.now - dt.timedelta(hours=1))
            .next_update(self.now + dt.timedelta(days=7))
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(self.now - dt.timedelta(minutes=30))
                .build()
            )
        crl = builder.sign(self.ca_key, hashes.SHA256())
        self.crl.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
