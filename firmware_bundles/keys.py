"""Ed25519 keys, key ids, key files and signed envelopes.

Rules:

* a key id is the lowercase hex SHA-256 of the 32-byte raw public key, so it names the key and
  nothing else (no metadata that an attacker could vary);
* a signed envelope is ``{"signed": {...}, "signatures": [{"keyid": hex, "sig": hex}]}`` and each
  signature covers ``canonical.encode(signed)``; an envelope read from bytes must itself be in
  canonical form (``parse_envelope``), so no byte of it can change without being noticed;
* a private key file is canonical JSON ``{"keytype": "ed25519", "private": hex, "role": ...}``,
  written with mode 0600.

    key = SigningKey.generate()
    env = sign_envelope({"type": "x"}, [key])
    parsed = parse_envelope(env)
    assert key.public.verify(parsed.signatures[0].sig, parsed.signed_bytes)
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firmware_bundles import canonical
from firmware_bundles.errors import FormatInvalid

KEYTYPE = "ed25519"
MAX_SIGNATURES = 32
MAX_ENVELOPE_SIZE = 4 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


def is_hex_digest(value: object) -> bool:
    """Whether ``value`` is 64 lowercase hex characters (a SHA-256 or a key id)."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (32 raw bytes) and its key id."""

    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise FormatInvalid("an Ed25519 public key is 32 bytes")

    @property
    def keyid(self) -> str:
        """Lowercase hex SHA-256 of the raw public key."""
        return hashlib.sha256(self.raw).hexdigest()

    def verify(self, sig: bytes, data: bytes) -> bool:
        """Whether ``sig`` is this key's valid signature of ``data``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(sig, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self) -> dict[str, str]:
        """The key as it appears in root metadata."""
        return {"keytype": KEYTYPE, "public": self.raw.hex()}

    @classmethod
    def from_json(cls, doc: object) -> PublicKey:
        """Parse ``{"keytype": "ed25519", "public": hex}``."""
        if not isinstance(doc, dict) or set(doc) != {"keytype", "public"}:
            raise FormatInvalid("a public key is {keytype, public}")
        if doc["keytype"] != KEYTYPE:
            raise FormatInvalid(f"unsupported key type {str(doc['keytype'])[:32]!r}")
        if not is_hex_digest(doc["public"]):
            raise FormatInvalid("a public key is 64 lowercase hex characters")
        return cls(bytes.fromhex(doc["public"]))


class SigningKey:
    """An Ed25519 private key (kept out of reprs and equality)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public = PublicKey(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """The key of a 32-byte seed (deterministic keys for tests and fixtures)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def keyid(self) -> str:
        """The public key's id."""
        return self.public.keyid

    def sign(self, data: bytes) -> bytes:
        """The 64-byte signature of ``data``."""
        return self._private.sign(data)

    def seed(self) -> bytes:
        """The 32 raw private bytes (only for writing key files)."""
        from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
            NoEncryption,
            PrivateFormat,
        )

        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid[:16]}...)"


def write_key_file(path: Path, key: SigningKey, role: str) -> None:
    """Write a private key file with mode 0600 (created exclusively: never overwrite a key)."""
    data = canonical.encode({"keytype": KEYTYPE, "private": key.seed().hex(), "role": role})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_key_file(path: Path) -> tuple[SigningKey, str]:
    """Read a private key file written by ``write_key_file``; returns ``(key, role)``."""
    doc = canonical.decode(path.read_bytes().strip(), max_size=4096)
    if not isinstance(doc, dict) or doc.get("keytype") != KEYTYPE:
        raise FormatInvalid(f"{path.name} is not an ed25519 key file")
    private, role = doc.get("private"), doc.get("role")
    if not isinstance(private, str) or not is_hex_digest(private) or not isinstance(role, str):
        raise FormatInvalid(f"{path.name} has no valid private key and role")
    return SigningKey.from_seed(bytes.fromhex(private)), role


@dataclass(frozen=True)
class Signature:
    """One signature entry of an envelope."""

    keyid: str
    sig: bytes = field(repr=False)


@dataclass(frozen=True)
class Envelope:
    """A parsed (not yet verified) envelope: the signed document, its bytes and signatures."""

    signed: Mapping[str, Any]
    signed_bytes: bytes = field(repr=False)
    signatures: tuple[Signature, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical signed bytes: names this document whatever its signatures."""
        return hashlib.sha256(self.signed_bytes).hexdigest()


def sign_envelope(signed: Mapping[str, Any], keys: Iterable[SigningKey]) -> bytes:
    """Sign ``signed`` with each key and return the canonical envelope bytes.

    Duplicate keys sign once; signatures are sorted by key id so the envelope is deterministic.
    """
    data = canonical.encode(signed)
    by_id = {key.keyid: key for key in keys}
    sigs = [{"keyid": kid, "sig": by_id[kid].sign(data).hex()} for kid in sorted(by_id)]
    return canonical.encode({"signatures": sigs, "signed": signed})


def parse_envelope(
    data: bytes | Mapping[str, Any], *, max_size: int = MAX_ENVELOPE_SIZE
) -> Envelope:
    """Parse an envelope from canonical bytes (or an already-parsed JSON object).

    Raises:
        FormatInvalid: not canonical JSON, not the envelope shape, bad hex, too many signatures.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        doc = canonical.decode_canonical(bytes(data), max_size=max_size)
    else:
        doc = data
        # A nested envelope (inside a command) is checked by re-encoding, same size cap.
        if len(canonical.encode(doc)) > max_size:
            raise FormatInvalid(f"envelope exceeds {max_size} bytes")
    if not isinstance(doc, Mapping) or set(doc) != {"signed", "signatures"}:
        raise FormatInvalid("an envelope is exactly {signed, signatures}")
    signed, raw_sigs = doc["signed"], doc["signatures"]
    if not isinstance(signed, Mapping) or not isinstance(raw_sigs, list):
        raise FormatInvalid("envelope 'signed' must be an object and 'signatures' a list")
    if len(raw_sigs) > MAX_SIGNATURES:
        raise FormatInvalid(f"more than {MAX_SIGNATURES} signatures")
    sigs: list[Signature] = []
    for entry in raw_sigs:
        if not isinstance(entry, Mapping) or set(entry) != {"keyid", "sig"}:
            raise FormatInvalid("a signature is exactly {keyid, sig}")
        keyid, sig = entry["keyid"], entry["sig"]
        # Lowercase only: "a" and "A" decode to the same byte, so accepting both would let a
        # flipped bit pass unnoticed.
        if not is_hex_digest(keyid) or not isinstance(sig, str) or not _HEX128.fullmatch(sig):
            raise FormatInvalid("signature keyid/sig are not lowercase hex of the right length")
        sigs.append(Signature(keyid=keyid, sig=bytes.fromhex(sig)))
    return Envelope(signed=signed, signed_bytes=canonical.encode(signed), signatures=tuple(sigs))
